"""`fedretrieve sim` and `fedretrieve demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="the whole system on one machine: data, federated "
        "training, baselines, node daemons + broker, report",
    )
    p.add_argument("--config", help="simulation TOML (default: sims/configs/default.toml)")
    p.add_argument("--out", required=True, help="output dir for the report and runs")
    p.add_argument(
        "--cache-dir",
        help="datasets and base models (default: $FEDRETRIEVE_CACHE or ~/.cache/fedretrieve)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_sim_command)

    d = sub.add_parser("demo", help="the default simulation (what `make demo` runs)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--cache-dir")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=run_sim_command, config=None)


def run_sim_command(args: argparse.Namespace) -> int:
    from common.cli import format_metrics
    from sims.simulation.pipeline import load_sim_config, run_sim
    from sims.synth.cli import cache_dir_from_env

    cfg = load_sim_config(args.config)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir_from_env()
    out = Path(args.out)
    report = run_sim(cfg, out, cache, progress=not args.no_progress)
    print()
    print(format_metrics(report["methods"]))
    comm = report["communication"]
    print(
        f"\nupload per node per round: {comm['adapter_bytes_per_node_per_round']:,} bytes "
        f"({100 * comm['fraction_of_full_model']:.2f}% of the full model); images sent: 0"
    )
    if "broker" in report:
        b = report["broker"]
        print(
            f"broker: {b['queries']} queries, p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms, "
            f"coverage {100 * b['coverage']:.1f}%, R1 {b['R1']:.2f}, "
            f"matches offline: {b['matches_offline']}"
        )
    print(f"total {report['timing']['total_s']} s")
    print(f"report: {out / 'report.md'} (json: {out / 'report.json'})")
    (out / "summary.txt").write_text(json.dumps(report["methods"], indent=1))
    return 0
