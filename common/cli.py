"""`fedretrieve train` and `fedretrieve eval`: the retrieval core from the command line."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="LoRA fine-tune a model on a dataset, save the adapter")
    p.add_argument("--data", required=True, help="dataset dir or annotation file")
    p.add_argument("--model", default="default", help="config name, model dir or hf:<id>")
    p.add_argument("--out", required=True, help="adapter output directory (PEFT format)")
    p.add_argument("--adapter", help="start from this adapter instead of a fresh one")
    p.add_argument("--split", default="train")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rank", type=int, help="LoRA rank (default: the model config's)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the model config's)")
    p.add_argument("--targets", nargs="+", help="LoRA target presets or regexes")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "plateau", "constant"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad entries")
    p.add_argument("--eval-split", default="test", help="evaluate on this split after training")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="text-to-image retrieval metrics (R1/R5/R10/mAP/mINP)")
    e.add_argument("--data", required=True)
    e.add_argument("--model", default="default")
    e.add_argument("--adapter", help="adapter directory to apply")
    e.add_argument("--split", default="test")
    e.add_argument("--json", dest="json_out", help="write the metrics JSON here")
    e.add_argument("--results", help="write the per-query top-k results file (CSV) here")
    e.add_argument("--topk", type=int, default=10)
    e.add_argument("--skip-bad", action="store_true")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=run_eval)


def _records(args, split: str):
    from common.datasets import load_records
    from common.errors import DatasetError

    records = load_records(args.data, skip_bad=args.skip_bad, split=split)
    if not records:
        raise DatasetError(f"{args.data}: no records in split {split!r}")
    return records


def format_metrics(rows: dict[str, dict]) -> str:
    """A fixed-width table of method -> metrics, for terminals and logs."""
    keys = ["R1", "R5", "R10", "mAP", "mINP"]
    width = max(12, *(len(k) for k in rows))
    lines = [f"{'method':<{width}} " + " ".join(f"{k:>6}" for k in keys)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}} " + " ".join(f"{m[k]:6.2f}" for k in keys))
    return "\n".join(lines)


def run_train(args) -> int:
    from common.adapters import load_adapter, save_adapter
    from common.evaluate import evaluate
    from common.factory import create_model
    from common.lora import LoraSettings, attach_lora, trainable_parameter_count
    from common.train import TrainConfig, train

    model = create_model(args.model, device=args.device)
    if args.adapter:
        peft_model = load_adapter(model, args.adapter, trainable=True)
    else:
        settings = LoraSettings.from_spec(
            model.spec.get("lora"),
            r=args.rank,
            alpha=args.alpha,
            targets=tuple(args.targets) if args.targets else None,
        )
        peft_model = attach_lora(model, settings)
    train_records = _records(args, args.split)
    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        schedule=args.schedule,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
    )
    print(
        f"model {model.version}: {trainable_parameter_count(peft_model):,} trainable of "
        f"{model.num_parameters():,} parameters; {len(train_records)} training images"
    )
    result = train(peft_model, train_records, cfg)
    manifest = save_adapter(
        peft_model, args.out, extra={"data": str(args.data), "epochs": args.epochs}
    )
    print(f"loss per epoch: {', '.join(f'{x:.3f}' for x in result.losses)} ({result.seconds:.1f}s)")
    print(f"adapter saved to {args.out} (version {manifest.model_version})")
    if args.eval_split:
        test = _records(args, args.eval_split)
        print(
            format_metrics({f"{args.eval_split} ({len(test)} images)": evaluate(peft_model, test)})
        )
    return 0


def run_eval(args) -> int:
    from common.evaluate import embed_records, top_k
    from common.factory import create_model
    from common.metrics import retrieval_metrics

    model = create_model(args.model, adapter=args.adapter, device=args.device)
    records = _records(args, args.split)
    emb = embed_records(model, records)
    metrics = retrieval_metrics(emb.queries @ emb.gallery.T, emb.query_ids, emb.gallery_ids)
    metrics["model_version"] = model.version
    print(format_metrics({model.version: metrics}))
    print(
        f"{metrics['queries']} queries, {metrics['gallery']} gallery images"
        + (
            f", {metrics['excluded']} queries without a match excluded"
            if metrics["excluded"]
            else ""
        )
    )
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(metrics, indent=2))
    if args.results:
        with open(args.results, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["query_index", "query", "rank", "image", "score"])
            for q, hits in enumerate(top_k(emb, args.topk)):
                for rank, (path, score) in enumerate(hits, 1):
                    writer.writerow([q, emb.query_texts[q], rank, Path(path).name, f"{score:.6f}"])
    return 0
