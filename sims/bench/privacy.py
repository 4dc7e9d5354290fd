"""`fedretrieve bench privacy --json OUT`: what private training costs and what it buys.

On the default simulation data and base model (sims/configs/default.toml, cached under
$FEDRETRIEVE_CACHE), with the default strategy (fedavg) for `--rounds` rounds:
- a privacy-utility table: R1/mAP of the final global adapter with no DP and with
  client-side fixed-clipping DP (under SecAgg+, the mode that composes with it) at each
  `--noise` multiplier, with the epsilon each reaches at `--delta` after the round budget;
- SecAgg+'s cost: seconds and bytes per round against the same run in the clear, and how
  far its global adapter is from the clear one (max |difference|);
- a dropout run: one node fails in SecAgg+'s masked-vector stage of round 1 (after the
  keys were shared), the others' sum is still unmasked;
- a loss-threshold membership-inference attack on one node's individual update (what the
  server holds in the clear without SecAgg+): members are that node's training crops,
  non-members its held-out crops of the same cameras; its advantage max_t |TPR - FPR|,
  without DP and with the update clipped and noised as the DP release would protect it.
Every timing figure is recorded with `os.getloadavg()`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from common.errors import ConfigError

log = logging.getLogger(__name__)

MASKED_STAGE = "collect_masked_vectors"


class DropInMaskedStage:
    """A ClientApp mod (outermost) that makes one simulated node fail in SecAgg+'s
    masked-vector stage of one round: a node lost after the keys were shared."""

    def __init__(self, partition: int, server_round: int) -> None:
        self.partition, self.server_round = partition, server_round

    def __call__(self, msg, ctxt, call_next):
        configs = msg.content.config_records.get("secaggplus_configs")
        plan = msg.content.config_records.get("config")
        if (
            configs is not None
            and configs.get("stage") == MASKED_STAGE
            and plan is not None
            and int(plan.get("server-round", -1)) == self.server_round
            and int(ctxt.node_config.get("partition-id", -1)) == self.partition
        ):
            raise RuntimeError(f"simulated dropout of partition {self.partition}")
        return call_next(msg, ctxt)


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "privacy", help="SecAgg+ and DP: privacy-utility table, costs, dropout, MIA"
    )
    p.add_argument("--json", dest="json_out", required=True, help="write the figures here")
    p.add_argument("--config", default=None, help="simulation TOML (default: default.toml)")
    p.add_argument("--cache-dir", default=None, help="default: $FEDRETRIEVE_CACHE")
    p.add_argument("--work", type=Path, default=Path("runs/bench-privacy"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--noise", default="0.3,0.6,1.0,2.0", help="noise multipliers (comma list)")
    p.add_argument("--clip-norm", type=float, default=0.05, help="dp-clip-norm")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--mia-epochs", type=int, default=3, help="local epochs of the attacked node")
    p.add_argument("--cpus", type=int, default=None)
    p.add_argument("--skip", default="", help="parts to skip: dp,secagg,dropout,mia")
    p.add_argument(
        "--reuse", action="store_true", help="reuse finished runs in --work with the same config"
    )
    p.set_defaults(func=main)


def _prepare(args):
    from common.datasets import load_records
    from common.factory import create_model
    from common.train import TextFeatureCache
    from sims.simulation.pipeline import base_model_spec, load_sim_config, prepare_data
    from sims.synth.cli import cache_dir_from_env

    cfg = load_sim_config(args.config)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir_from_env()
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(cfg.data, work, cache)
    base_spec = base_model_spec(cfg, data_dir, cache, progress=False)
    base = create_model(base_spec)
    records = load_records(data_dir)
    text_cache = TextFeatureCache(base.text_fingerprint)
    text_cache.get(base, [c for r in records for c in r.captions])
    text_file = str(text_cache.save(work / "text-features.pt"))
    return cfg, work, data_dir, base_spec, records, text_file


def main(args: argparse.Namespace) -> int:
    from server.fl.privacy import rdp_epsilon
    from sims.simulation.federated import run_federated

    logging.getLogger("flwr").propagate = False
    noises = [float(x) for x in args.noise.split(",") if x.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.rounds < 1 or any(z <= 0 for z in noises):
        raise ConfigError("--rounds must be >= 1 and every --noise > 0")
    cfg, work, data_dir, base_spec, records, text_file = _prepare(args)
    nodes = sorted({r.node for r in records if r.node and r.split == "train"})
    fed = cfg.federated
    common = {
        "local-epochs": fed.local_epochs,
        "lr": fed.lr,
        "batch-size": fed.batch_size,
        "eval-data": str(data_dir),
        "eval-split": "test",
        "seed": cfg.seed,
        "text-cache": text_file,
        "local-eval": False,
        "fraction-evaluate": 0.0,
    }

    def run(name: str, client_mods=(), **options):
        t0 = time.perf_counter()
        if args.reuse and _finished(work / name, {**common, **options}, args.rounds):
            from sims.simulation.federated import FederatedResult

            result = FederatedResult.from_history(work / name)
            final = result.rounds[-1]["global"]
            row = json.loads((work / name / "bench-row.json").read_text())
            log.info("%s: reused (R1 %.2f)", name, final["R1"])
            return result, row
        result = run_federated(
            data_dir,
            len(nodes),
            args.rounds,
            fed.default,
            base_spec,
            work / name,
            options={**common, **options},
            cpus=args.cpus,
            client_mods=client_mods,
        )
        final = result.rounds[-1]["global"]
        row = {
            "R1": final["R1"],
            "mAP": final["mAP"],
            "round_seconds": result.round_seconds,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "privacy": result.privacy,
        }
        log.info("%s: R1 %.2f mAP %.2f", name, row["R1"], row["mAP"])
        (work / name / "bench-row.json").write_text(json.dumps(row, default=str))
        return result, row

    figures: dict = {
        "setup": {
            "data": str(data_dir),
            "base_model": base_spec,
            "nodes": len(nodes),
            "rounds": args.rounds,
            "strategy": fed.default,
            "clip_norm": args.clip_norm,
            "delta": args.delta,
            "cpus": os.cpu_count(),
        }
    }
    clear, figures["clear"] = run("clear")
    if "secagg" not in skip:
        secure, figures["secagg"] = run("secagg", **{"secure-aggregation": True})
        figures["secagg_cost"] = _secagg_cost(clear, secure)
    if "dp" not in skip:
        table = [{"noise_multiplier": 0.0, "epsilon": math.inf, **_metrics(figures["clear"])}]
        for z in noises:
            _, row = run(
                f"dp-z{z:g}",
                **{
                    "secure-aggregation": True,
                    "dp": "client-fixed",
                    "dp-noise-multiplier": z,
                    "dp-clip-norm": args.clip_norm,
                    "dp-delta": args.delta,
                },
            )
            eps = rdp_epsilon(z, 1.0, args.rounds, args.delta)
            table.append({"noise_multiplier": z, "epsilon": round(eps, 3), **_metrics(row)})
            figures[f"dp-z{z:g}"] = row
        figures["privacy_utility"] = table
        within = [r for r in table[1:] if r["R1"] >= table[0]["R1"] - 3.0]
        figures["highest_noise_within_3_points"] = (
            max(within, key=lambda r: r["noise_multiplier"]) if within else None
        )
    if "dropout" not in skip:
        dropped, figures["dropout"] = run(
            "secagg-dropout",
            client_mods=(DropInMaskedStage(partition=0, server_round=1),),
            **{"secure-aggregation": True},
        )
        figures["dropout"]["rounds"] = [r.get("secagg") for r in dropped.rounds[1:]]
    if "mia" not in skip:
        figures["membership_inference"] = membership_inference(
            base_spec, records, nodes[0], cfg, args, noises, text_file
        )
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, default=str))
    print(format_figures(figures))
    print(f"figures: {out}")
    return 0


def _finished(out: Path, options: dict, rounds: int) -> bool:
    """Whether `out` holds a finished run of these options (for --reuse)."""
    path = out / "history.json"
    if not (path.is_file() and (out / "bench-row.json").is_file()):
        return False
    data = json.loads(path.read_text())
    config = data.get("config", {})
    same = all(config.get(k) == v for k, v in options.items() if k in config)
    return "final" in data and same and config.get("num-server-rounds") == rounds


def _metrics(row: dict) -> dict:
    return {"R1": round(row["R1"], 2), "mAP": round(row["mAP"], 2)}


def _load_adapter(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _secagg_cost(clear, secure) -> dict:
    rows = [r for r in secure.rounds[1:] if "secagg" in r]
    clear_rows = clear.rounds[1:]
    per_round_extra = [
        round(s["seconds"] - c["seconds"], 3)
        for s, c in zip(secure.rounds[1:], clear_rows, strict=True)
    ]
    cost = {
        "secagg_seconds_per_round": [r["secagg"]["seconds"] for r in rows],
        "stage_seconds": [r["secagg"]["stage_seconds"] for r in rows],
        "extra_round_seconds_vs_clear": per_round_extra,
        "bytes_down_per_round": [r["secagg"]["bytes_down"] for r in rows],
        "bytes_up_per_round": [r["secagg"]["bytes_up"] for r in rows],
        "clear_bytes_per_round": 2 * clear.payload_bytes * len(clear_rows[0].get("accepted", [])),
        "loadavg": [r["secagg"]["loadavg"] for r in rows],
    }
    a, b = _load_adapter(clear.final_adapter), _load_adapter(secure.final_adapter)
    cost["max_abs_diff_final_adapter"] = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    cost["max_abs_final_adapter"] = max(float(np.abs(a[k]).max()) for k in a)
    return cost


def membership_inference(base_spec, records, node, cfg, args, noises, text_file) -> dict:
    """Loss-threshold MIA on `node`'s individual update (calibrated by the base model)."""
    import torch

    from common.factory import create_lora_model
    from common.lora import get_adapter_state, set_adapter_state
    from common.train import ImageBank, TextFeatureCache, TrainConfig, core_model, train

    members = [r for r in records if r.node == node and r.split == "train"]
    held_out = [r for r in records if r.node == node and r.split == "test"]
    if not held_out:  # the test split has no node field: same cameras, held-out identities
        cams = {r.camera_id for r in members}
        held_out = [r for r in records if r.split == "test" and r.camera_id in cams]
    n = min(len(members), len(held_out))
    rng = np.random.default_rng(cfg.seed)
    members = [members[i] for i in sorted(rng.choice(len(members), n, replace=False))]
    held_out = [held_out[i] for i in sorted(rng.choice(len(held_out), n, replace=False))]
    model = create_lora_model(base_spec)
    core = core_model(model)
    cache = TextFeatureCache.load(text_file, core.text_fingerprint)
    bank = ImageBank(members + held_out, core.preprocess)
    base_state = get_adapter_state(model)
    before = _losses(model, members + held_out, cache, bank)
    train_bank = ImageBank([r for r in records if r.node == node and r.split == "train"],
                           core.preprocess)  # fmt: skip
    train(
        model,
        [r for r in records if r.node == node and r.split == "train"],
        TrainConfig(
            epochs=args.mia_epochs,
            lr=cfg.federated.lr,
            batch_size=cfg.federated.batch_size,
            seed=cfg.seed,
            progress=False,
        ),
        text_cache=cache,
        bank=train_bank,
    )
    trained = get_adapter_state(model)
    labels = np.r_[np.ones(n), np.zeros(n)]
    change = math.sqrt(sum(float((trained[k] - base_state[k]).double().square().sum())
                           for k in trained))  # fmt: skip
    out = {"node": node, "members": n, "non_members": n, "update_norm": round(change, 4)}

    def advantage(state) -> float:
        set_adapter_state(model, state, where="mia")
        after = _losses(model, members + held_out, cache, bank)
        return _advantage(-(after - before), labels)  # larger drop in loss: member

    out["no_dp"] = round(advantage(trained), 4)
    gen = torch.Generator().manual_seed(cfg.seed)
    factor = min(1.0, args.clip_norm / change) if change > 0 else 1.0
    clipped = {k: base_state[k] + factor * (trained[k] - base_state[k]) for k in trained}
    out["clipped_only"] = round(advantage(clipped), 4)
    for z in noises:
        noisy = {
            k: v + torch.randn(v.shape, generator=gen, dtype=torch.float32) * z * args.clip_norm
            for k, v in clipped.items()
        }
        out[f"dp_z{z:g}"] = round(advantage(noisy), 4)
    return out


def _losses(model, records, cache, bank) -> np.ndarray:
    """Per-image InfoNCE loss against the pool's first captions (its own is the target)."""
    from common.evaluate import embed_records

    emb = embed_records(model, records, text_cache=cache, bank=bank)
    by_path = {p: i for i, p in enumerate(emb.gallery_paths)}
    first = {}
    for i, r in enumerate(records):
        first.setdefault(r.image_path, i)
    caps = np.cumsum([0] + [len(r.captions) for r in records])[:-1]
    img = emb.gallery[[by_path[r.image_path] for r in records]]
    txt = emb.queries[caps]
    logits = 20.0 * img @ txt.T
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.diag(log_p)


def _advantage(scores: np.ndarray, labels: np.ndarray) -> float:
    """max over thresholds of TPR - FPR (the membership advantage of a threshold attack)."""
    order = np.argsort(-scores)
    hits = labels[order]
    tpr = np.cumsum(hits) / max(1, hits.sum())
    fpr = np.cumsum(1 - hits) / max(1, (1 - hits).sum())
    return float(np.max(np.abs(tpr - fpr)))


def format_figures(f: dict) -> str:
    lines = [f"clear: R1 {f['clear']['R1']:.2f} mAP {f['clear']['mAP']:.2f}"]
    if "privacy_utility" in f:
        lines.append(f"{'noise':>6} {'epsilon':>9} {'R1':>6} {'mAP':>6}")
        for r in f["privacy_utility"]:
            lines.append(
                f"{r['noise_multiplier']:6.2f} {r['epsilon']:9.3f} {r['R1']:6.2f} {r['mAP']:6.2f}"
            )
    if "secagg_cost" in f:
        c = f["secagg_cost"]
        lines.append(
            f"SecAgg+ s/round {c['secagg_seconds_per_round']}, "
            f"bytes up/round {c['bytes_up_per_round']}"
        )
    if "membership_inference" in f:
        lines.append(f"MIA advantage: {f['membership_inference']}")
    return "\n".join(lines)
