"""`fedretrieve distill` and `fedretrieve prune`: smaller image towers for GPU-less nodes.

Both write a model directory (`save_model`) that names its teacher, so a node or the broker
can tell which query space the model serves; both run wherever the crops are: on the server
over the source split, or on a node over its own gallery crops (no captions needed, no
image leaves it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "distill",
        help="distil the served model's image tower into a smaller student",
        description="Train a student image tower to put crops where the teacher (base model "
        "+ adapter) puts them; the student keeps the teacher's text side (docs/compress.md).",
    )
    d.add_argument("--student", required=True, help="model config of the student (e.g. student-s4)")
    d.add_argument(
        "--init",
        type=Path,
        help="continue from this student (e.g. distilled on the server, refined on a node)",
    )
    _common(d)
    d.set_defaults(func=run_distill, epochs=20)

    p = sub.add_parser(
        "prune",
        help="structured pruning of the CNN image tower, with a distilled recovery",
        description="Remove the weakest inner channels of every residual block (L1 x |gamma|), "
        "then recover by distillation from the unpruned model (docs/compress.md).",
    )
    p.add_argument("--keep", type=float, required=True, help="share of inner channels kept")
    _common(p)
    p.set_defaults(func=run_prune, epochs=3)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="default", help="teacher base: config, model dir, hf:<id>")
    p.add_argument("--adapter", type=Path, help="the teacher's adapter (what the fleet serves)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset dir or annotation file to distil on")
    src.add_argument("--crops", type=Path, help="a folder of crops (a node's gallery images)")
    p.add_argument("--split", default="train", help="dataset split(s), comma list (with --data)")
    p.add_argument("--no-captions", action="store_true", help="ignore captions (mimicry only)")
    p.add_argument("--node", help="only this node's crops (dataset `node` field), train and eval")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--epochs", type=int, help="passes over the crops (distill 20, prune 3)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--text-weight",
        type=float,
        default=0.0,
        help="weight of the contrastive term on captioned crops (0: mimicry only; it cost R1 "
        "when tried, docs/compress.md)",
    )
    p.add_argument("--eval-data", help="dataset for R1/mAP of teacher and result (default --data)")
    p.add_argument("--eval-split", default="test", help="'' to skip the evaluation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def _crop_records(args):
    from common.datasets import Record, load_records
    from common.errors import DatasetError

    if args.crops is not None:
        if not args.crops.is_dir():
            raise DatasetError(f"--crops {args.crops}: not a folder")
        paths = sorted(p for p in args.crops.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        records = [Record(p, (), -1 - i) for i, p in enumerate(paths)]
    else:
        splits = [s.strip() for s in args.split.split(",") if s.strip()]
        records = [r for s in splits for r in load_records(args.data, split=s)]
        records = _of_node(records, args.node)
    if args.no_captions:
        records = [dataclasses.replace(r, captions=()) for r in records]
    if not records:
        raise DatasetError(f"no crops to distil on in {args.crops or args.data} ({args.split})")
    return records


def _finish(args, teacher, result_model, fit: dict) -> int:
    from common.datasets import load_records
    from common.distill import evaluate_against_teacher, save_student

    report = {"fit": fit, "crops": fit.pop("crops")}
    eval_data = args.eval_data or args.data
    if args.eval_split and eval_data:
        test = _of_node(load_records(eval_data, split=args.eval_split), args.node)
        measured = evaluate_against_teacher(teacher, result_model, test)
        report["eval"] = {
            "split": args.eval_split,
            "teacher": _metrics(measured["teacher"]),
            "model": _metrics(measured["model"]),
            "agreement": measured["agreement"],
        }
    save_student(result_model, args.out, report=report)
    print(json.dumps(report, indent=2))
    print(f"model written to {args.out} (teacher {teacher.version})")
    return 0


def _of_node(records: list, node: str | None) -> list:
    return records if not node else [r for r in records if r.node == node]


def _metrics(m: dict) -> dict:
    return {k: round(float(m[k]), 2) for k in ("R1", "R5", "mAP")}


def _fit(args, student, teacher, records) -> dict:
    from common.distill import DistillConfig, distill

    cfg = DistillConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        text_weight=0.0 if args.no_captions else args.text_weight,
        seed=args.seed,
        device=args.device,
    )
    result = distill(student, teacher, records, cfg)
    return {
        **dataclasses.asdict(cfg),
        "crops": len({r.image_path for r in records}),
        "losses": [round(x, 4) for x in result.losses],
        "seconds": round(result.seconds, 1),
    }


def run_distill(args) -> int:
    from common.distill import student_from_config
    from common.errors import ConfigError
    from common.factory import create_model

    teacher = create_model(args.teacher, adapter=args.adapter, device=args.device)
    student = student_from_config(teacher, args.student, seed=args.seed)
    if args.init:
        start = create_model(args.init, device=args.device)
        if start.teacher.get("fingerprint") != teacher.fingerprint:
            was = start.teacher.get("model_version") or "no teacher"
            raise ConfigError(
                f"--init {args.init}: a student of {was}, not of this teacher's base "
                f"({teacher.version})"
            )
        student.load_state_dict(start.state_dict())
    records = _crop_records(args)
    print(
        f"teacher {teacher.version}: {teacher.image_tower_params():,} image parameters; "
        f"student {args.student}: {student.image_tower_params():,}; {len(records)} crops"
    )
    return _finish(args, teacher, student, _fit(args, student, teacher, records))


def run_prune(args) -> int:
    from common.distill import teacher_record
    from common.factory import create_model
    from common.prune import prune_image_tower

    teacher = create_model(args.teacher, adapter=args.adapter, device=args.device)
    pruned = prune_image_tower(teacher, args.keep)
    pruned.teacher = teacher_record(teacher)
    records = _crop_records(args)
    print(
        f"teacher {teacher.version}: {teacher.image_tower_params():,} image parameters; "
        f"pruned (keep {args.keep}): {pruned.image_tower_params():,}; {len(records)} crops"
    )
    fit = _fit(args, pruned, teacher, records) if args.epochs else {"crops": len(records)}
    return _finish(args, teacher, pruned, {**fit, "keep": args.keep})
