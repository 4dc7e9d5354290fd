"""`fedretrieve node ...`: the edge node's commands.

Heavy imports (torch, faiss, grpc) happen inside the handlers so `fedretrieve --help` stays
fast on a Jetson. Issue 8 (ONNX/TensorRT export) adds its `export` command in this module.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    node = subparsers.add_parser("node", help="edge node daemon (gallery, index, NodeService)")
    actions = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)

    serve = actions.add_parser(
        "serve",
        help="run the node daemon until SIGTERM",
        description="Serve this node's gallery over gRPC (see docs/node.md).",
    )
    serve.add_argument("--config", required=True, type=Path, help="node TOML file")
    serve.set_defaults(func=_serve)

    check = actions.add_parser("check-config", help="validate a node TOML file and print it")
    check.add_argument("--config", required=True, type=Path, help="node TOML file")
    check.set_defaults(func=_check_config)

    from edge_node.accel.cli import register_export  # `fedretrieve export` (issue 8)

    register_export(subparsers)

    from edge_node.ingest_cli import register as register_ingest  # `fedretrieve ingest`

    register_ingest(subparsers)


def _serve(args: argparse.Namespace) -> int:
    from edge_node.config import load_node_config
    from edge_node.serving.daemon import serve

    return serve(load_node_config(args.config))


def _check_config(args: argparse.Namespace) -> int:
    from edge_node.config import load_node_config

    print(load_node_config(args.config))
    return 0
