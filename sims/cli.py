"""The `fedretrieve` command: one entry point composing every package's subcommands.

It lives in `sims/` because this is the only package allowed to import all the others
(DESIGN.md §2). Each package owns its commands in its own `cli.py` (or the module named
below) through `register(subparsers)`; a command's heavy imports happen inside its handler
so `fedretrieve --help` stays fast on a Jetson.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "common.cli",  # train, eval
    "common.compress_cli",  # distill, prune
    "sims.synth.cli",  # synth, pretrain
    "edge_node.cli",  # node serve, export
    "server.broker.cli",  # broker serve
    "server.operator.cli",  # query
    "server.console.cli",  # console (the operator's web page)
    "sims.simulation.fl_cli",  # fl simulate (runs ServerApp + ClientApp in one process)
    "sims.simulation.cli",  # sim, demo
    "sims.bench.cli",  # bench embed, node, broker, fleet
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedretrieve",
        description="Federated text-to-person retrieval: edge nodes, Flower server, query broker.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from common.errors import FedRetrieveError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Flower prints through its own handler; without this every line appears twice
    logging.getLogger("flwr").propagate = False
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FedRetrieveError as err:
        print(f"fedretrieve {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
