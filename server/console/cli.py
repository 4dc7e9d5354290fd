"""`fedretrieve console --config console.toml`: the operator console (a web page).

Heavy imports (Starlette, uvicorn, gRPC stubs) happen inside the handler so
`fedretrieve --help` stays fast.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    console = subparsers.add_parser(
        "console",
        help="the operator console: search, find similar, sightings, audit (a web page)",
        description="Serve the operator console; it talks to the broker only (docs/console.md).",
    )
    console.add_argument(
        "--config", required=True, help="console TOML (see server/console/console.example.toml)"
    )
    console.set_defaults(func=run_console)


def run_console(args: argparse.Namespace) -> int:
    from server.console.config import load_console_config
    from server.console.server import serve

    return serve(load_console_config(args.config))
