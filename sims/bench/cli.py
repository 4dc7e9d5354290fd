"""`fedretrieve bench ...`: benchmarks that write JSON figures, one module each.

Each module exposes `register_bench(subparsers)` and owns its figures and its command line;
heavy imports happen in its handler so `fedretrieve --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib

# bench name -> module; `--help` lists them in this order.
BENCHES = {
    "embed": "sims.bench.embed",  # torch vs onnxruntime (fp32, int8) embedding throughput
    "node": "sims.bench.node",  # node search latency and ingest throughput
    "broker": "sims.bench.broker",  # broker fan-out latency vs a direct node call
    "fleet": "sims.bench.fleet",  # broker tail latency and coverage with 10-1000 sites
    "fleet-model": "sims.bench.fleet_model",  # that report extrapolated to separate hosts
    "privacy": "sims.bench.privacy",  # SecAgg+ / DP: privacy-utility, costs, dropout, MIA
    "mining": "sims.bench.mining",  # label-free tracklets and pseudo-identities vs the truth
    "compress": "sims.bench.compress",  # distilled students, pruned towers: speed, RSS, R1
}


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="benchmarks that write JSON figures")
    benches = b.add_subparsers(dest="bench", metavar="BENCH")
    for module in BENCHES.values():
        importlib.import_module(module).register_bench(benches)
    b.set_defaults(func=lambda args: b.print_help() or 2)
