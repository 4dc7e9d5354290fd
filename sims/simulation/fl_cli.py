"""`fedretrieve fl simulate`: federated LoRA training on one machine (Flower simulation engine).
`fedretrieve fl check`: the run config `flwr run` would send, validated with the key named.

It lives in `sims/` because it runs the ServerApp and the ClientApp in one process, and only
`sims/` may import both `server` and `edge_node` (DESIGN.md §2). The deployment engine
needs no command of ours: `flower-superlink`, `flower-supernode` and `flwr run` (see
docs/federated.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def register(subparsers: argparse._SubParsersAction) -> None:
    fl = subparsers.add_parser("fl", help="federated LoRA training (Flower)")
    sub = fl.add_subparsers(dest="fl_command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "simulate", help="run the Flower app on the simulation engine, one virtual node per node"
    )
    p.add_argument("--data", required=True, type=Path, help="dataset with `node` fields")
    p.add_argument("--nodes", required=True, type=int, help="virtual SuperNodes")
    p.add_argument("--rounds", required=True, type=int, help="federated rounds")
    p.add_argument("--out", required=True, type=Path, help="output dir (adapters, history)")
    p.add_argument("--strategy", default="ffa", choices=["fedavg", "ffa", "robust"])
    p.add_argument("--model", default="default", help="config name, model dir or hf:<id>")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: the run config's")
    p.add_argument("--max-steps", type=int, default=0, help="cap local steps per round")
    p.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx strength")
    p.add_argument("--eval-data", default="", help="server held-out set (default: --data)")
    p.add_argument("--cpus", type=int, default=None, help="cores for Ray (default: all, <= 4)")
    p.add_argument(
        "--set",
        dest="options",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="any other run-config key, e.g. --set robust-aggregator=median",
    )
    p.set_defaults(func=run_simulate)

    c = sub.add_parser(
        "check",
        help="validate a run config as `flwr run --run-config` would send it, naming bad keys",
    )
    c.add_argument("--app", type=Path, default=Path("."), help="Flower app dir (pyproject.toml)")
    c.add_argument(
        "--run-config",
        default="",
        help="the same string as `flwr run --run-config`, e.g. \"strategy='ffa' lr=0.01\"",
    )
    c.set_defaults(func=run_check)


def check_run_config(app: Path, run_config: str) -> str:
    """A one-line summary of the fused run config, or ConfigError naming the bad key.

    Flower's SuperLink refuses an override key that pyproject.toml does not declare with a
    bare "Invalid run configuration."; this names it (and the closest declared key), then
    runs the ServerApp's own validation (FlConfig) on the fused config.
    """
    import difflib

    from flwr.common.config import flatten_dict, get_project_config, parse_config_args

    from common.errors import ConfigError
    from server.fl.run_config import FlConfig

    try:
        defaults = flatten_dict(get_project_config(app)["tool"]["flwr"]["app"].get("config", {}))
        overrides = parse_config_args([run_config]) if run_config.strip() else {}
    except (ValueError, KeyError, OSError) as err:
        raise ConfigError(f"cannot read the run config: {err}") from None
    for key in overrides:
        if key not in defaults:
            near = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean `{near[0]}`?" if near else ""
            raise ConfigError(
                f"run config key `{key}` is not declared in [tool.flwr.app.config] of "
                f"{app / 'pyproject.toml'} (Flower answers only 'Invalid run configuration'){hint}"
            )
    cfg = FlConfig.from_run_config({**defaults, **overrides})
    privacy = "SecAgg+" if cfg.secure_aggregation else "no SecAgg"
    if cfg.dp != "off":
        from server.fl.privacy import PrivacyLedger

        ledger = PrivacyLedger.from_config(cfg)
        eps = ledger.epsilon_after(cfg.num_server_rounds)
        privacy += f", dp {cfg.dp} (epsilon {eps:.3f} at delta {cfg.dp_delta:g} after all rounds)"
    return (
        f"ok: {cfg.num_server_rounds} rounds of {cfg.strategy}, min-nodes {cfg.min_nodes}, "
        f"{privacy}"
    )


def run_check(args: argparse.Namespace) -> int:
    print(check_run_config(args.app, args.run_config))
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    import logging

    from sims.simulation.federated import run_federated

    # Flower's logger has its own console handler; without this every line prints twice
    # (once more through the root handler `fedretrieve` installs).
    logging.getLogger("flwr").propagate = False

    options = {
        "local-epochs": args.local_epochs,
        "max-steps": args.max_steps,
        "proximal-mu": args.proximal_mu,
        "eval-data": args.eval_data,
        **dict(args.options),
    }
    if args.lr is not None:
        options["lr"] = args.lr
    result = run_federated(
        args.data,
        args.nodes,
        args.rounds,
        strategy=args.strategy,
        model_spec=args.model,
        out_dir=args.out,
        options=options,
        cpus=args.cpus,
        verbose=getattr(args, "verbose", False),
    )
    print(format_rounds(result))
    print(f"final adapter: {result.final_adapter}")
    for node, path in sorted(result.handover.items()):
        print(f"  handed over to {node}: {path}")
    return 0


def format_rounds(result) -> str:
    lines = [f"{'round':>5} {'R1':>6} {'mAP':>6} {'up/node':>10} {'seconds':>8}"]
    for row in result.rounds:
        metrics = row.get("global", {})
        up = max(row.get("upload_bytes", {}).values(), default=0)
        lines.append(
            f"{row['round']:>5} {metrics.get('R1', float('nan')):6.2f} "
            f"{metrics.get('mAP', float('nan')):6.2f} {up:>10,} {row.get('seconds', 0.0):8.1f}"
        )
    lines.append(
        f"payload per node per round: {result.payload_bytes:,} bytes = "
        f"{100 * result.payload_fraction:.3f}% of the fp32 model"
    )
    return "\n".join(lines)
