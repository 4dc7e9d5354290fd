"""`fedretrieve bench compress --json OUT`: teacher vs distilled students vs pruned towers.

What it answers: how much faster, smaller and lighter a GPU-less node gets with a student
or a pruned image tower, what that costs in Rank-1, and what a fleet mixing teacher and
student nodes gets from the broker's merge. Every model is exported to ONNX fp32 and INT8
(static, calibrated on train-split crops) and measured as a node runs it: onnxruntime on
one thread, image graph from normalised pixels, batch 1 and 8. Each (model, precision) is
timed in a child process of its own, one after another, so rows do not share caches or
cores; ratios are only meaningful within one run (`machine.loadavg_*` says how busy the
machine was). Queries are the teacher's text embeddings: a student keeps the teacher's text
side, and the broker embeds every query once.

Memory (`rss_mb`, `rss_mb_vector_only`): the real node daemon (`fedretrieve node serve`,
onnxruntime backend on the export) started as an operator starts it, with a gallery of
`--gallery` crops that it embeds and indexes itself; VmRSS of that process once all are
indexed, with the text tower on and off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sims.bench.workload import run_in_child

MIX_K = 10


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("compress", help="students and pruned towers vs the teacher")
    p.add_argument("--json", dest="json_out", required=True, help="write the figures here")
    p.add_argument("--teacher", required=True, help="base model (config, model dir)")
    p.add_argument("--adapter", type=Path, help="the teacher's adapter (what the fleet serves)")
    p.add_argument("--data", required=True, help="dataset: test split for R1, train for INT8")
    p.add_argument("--students", default="", help="student model dirs (comma list)")
    p.add_argument("--pruned", default="", help="pruned model dirs (comma list)")
    p.add_argument("--mixed-student", default="", help="student of the mixed fleet (default: "
                   "the INT8 student with the best R1)")  # fmt: skip
    p.add_argument("--gallery", type=int, default=10_000, help="crops a node indexes for RSS")
    p.add_argument("--skip-rss", action="store_true", help="no node daemons (speed and R1 only)")
    p.add_argument(
        "--rss-models",
        default="",
        help="measure node RSS only for these row names (comma list; default every row: "
        "two node daemons per row, ~30 s each)",
    )
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--timed-s", type=float, default=1.5, help="seconds timed per speed cell")
    p.add_argument("--work", type=Path, default=Path("runs/bench_compress"))
    p.set_defaults(func=main)


# ---------------------------------------------------------------------- child: one export
def _measure(job: dict) -> dict:
    import onnxruntime as ort

    from common.datasets import load_records
    from common.preprocess import PreprocessCfg, load_image, to_pixels
    from edge_node.accel.manifest import MANIFEST_FILE
    from sims.bench.embed import sample_crops

    manifest = json.loads(Path(job["export"], MANIFEST_FILE).read_text())
    cfg = PreprocessCfg.from_dict(manifest["preprocess"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    graph = Path(job["export"], manifest["graphs"]["image"])
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    pixels = to_pixels(sample_crops(8, tuple(cfg.size), seed=1), cfg)
    rates = {}
    for batch in (1, 8):
        x = np.ascontiguousarray(pixels[:batch])
        for _ in range(5):
            session.run(None, {"pixels": x})
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < job["timed_s"]:
            session.run(None, {"pixels": x})
            runs += 1
        rates[batch] = runs * batch / (time.perf_counter() - t0)
    records = load_records(job["data"], split="test")
    gallery = []
    for i in range(0, len(records), 64):
        chunk = to_pixels([load_image(r.image_path) for r in records[i : i + 64]], cfg)
        gallery.append(session.run(None, {"pixels": chunk})[0])
    np.save(job["embeddings"], np.concatenate(gallery).astype(np.float32))
    return {
        "crops_per_s_b1": round(rates[1], 1),
        "crops_per_s_b8": round(rates[8], 1),
        "file_mb": round(graph.stat().st_size / 2**20, 2),
    }


# ---------------------------------------------------------------------- parent
def _load_models(args) -> list[tuple[str, str, object]]:
    """(name, kind, merged DualEncoder) for the teacher, each student, each pruned tower."""
    from common.errors import ConfigError
    from common.factory import create_model

    teacher = create_model(args.teacher, adapter=args.adapter).eval()
    models = [("teacher", "teacher", teacher)]
    for kind, dirs in (("student", args.students), ("pruned", args.pruned)):
        for d in [x for x in dirs.split(",") if x.strip()]:
            model = create_model(d.strip()).eval()
            if model.teacher.get("model_version") != teacher.version:
                raise ConfigError(
                    f"{d}: distilled from {model.teacher.get('model_version') or 'no teacher'}, "
                    f"not from the teacher measured here ({teacher.version})"
                )
            models.append((Path(d).name, kind, model))
    return models


def _metrics(queries: np.ndarray, q_ids, gallery: np.ndarray, g_ids) -> dict:
    from common.metrics import retrieval_metrics

    m = retrieval_metrics(queries @ gallery.T, q_ids, g_ids)
    return {"R1": round(float(m["R1"]), 2), "mAP": round(float(m["mAP"]), 2)}


@dataclass(frozen=True, slots=True)
class _Hit:
    """What the broker's merge functions read from a node's hit."""

    node_id: str
    image_id: int
    score: float


def mixed_fleet_r1(
    queries: np.ndarray,
    q_ids: np.ndarray,
    g_ids: np.ndarray,
    nodes: np.ndarray,
    embeddings: dict[str, np.ndarray],
    served_by: dict[str, str],
) -> dict[str, float]:
    """Rank-1 of the broker's merge when node n serves `embeddings[served_by[n]]`: merged
    by raw score as one version (`score`) and by version with rank fusion (`rrf`)."""
    from server.broker.merge import merge_mixed_versions, merge_topk

    hits = {"score": 0, "rrf": 0}
    members = {n: np.flatnonzero(nodes == n) for n in served_by}
    sims = {name: queries @ emb.T for name, emb in embeddings.items()}
    for q in range(len(queries)):
        lists: dict[str, list] = {}
        for n, rows in members.items():
            s = sims[served_by[n]][q, rows]
            top = rows[np.argsort(-s, kind="stable")[:MIX_K]]
            lists.setdefault(served_by[n], []).append(
                [_Hit(n, int(i), float(sims[served_by[n]][q, i])) for i in top]
            )
        by_score = merge_topk([lst for per in lists.values() for lst in per], 1)
        fused = merge_mixed_versions(lists, 1)
        hits["score"] += int(g_ids[by_score[0].image_id] == q_ids[q])
        hits["rrf"] += int(g_ids[fused[0].hit.image_id] == q_ids[q])
    return {k: round(100.0 * v / len(queries), 2) for k, v in hits.items()}


def main(args: argparse.Namespace) -> int:
    import torch

    from common.datasets import load_records
    from common.distill import embedding_agreement
    from common.preprocess import load_image
    from edge_node.accel.export import export_model

    started, load_before = time.time(), os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    models = _load_models(args)
    teacher = models[0][2]
    test = load_records(args.data, split="test")
    train = load_records(args.data, split="train")
    step = max(1, len(train) // args.calib_images)
    calib = [load_image(r.image_path) for r in train[::step][: args.calib_images]]
    captions = [(c, r.person_id) for r in test for c in r.captions]
    queries = teacher.encode_text([c for c, _ in captions]).numpy()
    q_ids = np.array([p for _, p in captions])
    g_ids = np.array([r.person_id for r in test])
    rows, embeddings = [], {}
    for name, kind, model in models:
        for precision in ("fp32", "int8"):
            out = args.work / name / f"onnx-{precision}"
            with torch.no_grad():
                export_model(
                    model,
                    out,
                    model_spec=str(out),
                    precision=precision,
                    calib_images=calib if precision == "int8" else None,
                )
            emb_file = args.work / name / f"test-{precision}.npy"
            job = {
                "name": name,
                "precision": precision,
                "export": str(out),
                "data": args.data,
                "timed_s": args.timed_s,
            }
            figures = run_in_child(
                _measure, {**job, "embeddings": str(emb_file)}, f"{name} {precision}"
            )
            embeddings[f"{name}/{precision}"] = emb = np.load(emb_file)
            # against the teacher's fp32 export (the first row): the same crops, one order
            agreement = embedding_agreement(embeddings["teacher/fp32"], emb)["cos_mean"]
            row = {
                "name": name,
                "kind": kind,
                "precision": precision,
                "params": model.image_tower_params(),
                **figures,
                **_metrics(queries, q_ids, emb, g_ids),
                "agreement_cos": round(float(agreement), 4),
                "export": str(out),
                "rss_mb": None,  # not measured (--skip-rss, --rss-models)
                "rss_mb_vector_only": None,
            }
            rss_models = {x.strip() for x in args.rss_models.split(",") if x.strip()}
            if not args.skip_rss and (not rss_models or name in rss_models):
                from sims.bench import compress_rss

                row.update(compress_rss.node_rss(out, args.work / "rss", args.gallery))
            rows.append(row)
            print(_line(row), flush=True)
    result = {
        "command": "fedretrieve " + " ".join(sys.argv[1:]),
        "teacher": teacher.version,
        "rows": rows,
        "mixed_fleet": _mixed(args, rows, embeddings, queries, q_ids, g_ids, test),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "seconds": round(time.time() - started, 1),
        },
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["mixed_fleet"], indent=2))
    return 0


def _mixed(args, rows, embeddings, queries, q_ids, g_ids, test) -> dict:
    """2 (half) of the nodes serve the teacher fp32, the others the chosen INT8 student."""
    students = [r for r in rows if r["kind"] == "student" and r["precision"] == "int8"]
    if not students:
        return {}
    pick = args.mixed_student or max(students, key=lambda r: r["R1"])["name"]
    nodes = np.array([r.node or "node0" for r in test])
    names = sorted(set(nodes))
    half = max(1, len(names) // 2)
    served = {n: ("teacher/fp32" if i < half else f"{pick}/int8") for i, n in enumerate(names)}
    mixed = mixed_fleet_r1(queries, q_ids, g_ids, nodes, embeddings, served)
    teacher_only = mixed_fleet_r1(
        queries, q_ids, g_ids, nodes, embeddings, dict.fromkeys(names, "teacher/fp32")
    )
    return {
        "student": pick,
        "nodes": served,
        "R1_mixed": mixed["score"],
        "R1_mixed_rrf": mixed["rrf"],
        "R1_all_teacher": teacher_only["score"],
        "merge": "score",
    }


def _line(row: dict) -> str:
    rss = f" rss {row['rss_mb']}/{row['rss_mb_vector_only']} MB" if row["rss_mb"] else ""
    return (
        f"{row['name']:<24} {row['precision']:<5} {row['params']:>9,} params "
        f"{row['file_mb']:6.2f} MB  b1 {row['crops_per_s_b1']:8.1f}/s  b8 "
        f"{row['crops_per_s_b8']:8.1f}/s  R1 {row['R1']:5.2f} mAP {row['mAP']:5.2f} "
        f"cos {row['agreement_cos']:.3f}{rss}"
    )
