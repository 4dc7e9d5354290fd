"""`fedretrieve broker serve`: run the query broker until SIGTERM.

The daemon's imports happen inside the handler so `fedretrieve --help` stays fast.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    broker = subparsers.add_parser("broker", help="the query broker (BrokerService)")
    sub = broker.add_subparsers(dest="broker_command", metavar="SUBCOMMAND", required=True)
    serve = sub.add_parser("serve", help="run the broker until SIGTERM")
    serve.add_argument(
        "--config", required=True, help="broker TOML (see server/broker/broker.example.toml)"
    )
    serve.set_defaults(func=run_broker_serve)


def run_broker_serve(args: argparse.Namespace) -> int:
    from server.broker.config import load_broker_config
    from server.broker.daemon import serve

    return serve(load_broker_config(args.config))
