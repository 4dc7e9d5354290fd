"""`fedretrieve synth` (generate the benchmark) and `fedretrieve pretrain` (base model)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sims.synth.cameras import LOOK_SETS

DEFAULT_CACHE = "~/.cache/fedretrieve"


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size must look like 128x64 (HxW), got {text!r}") from err
    return h, w


def register(subparsers: argparse._SubParsersAction) -> None:
    from sims.synth.generate import SynthConfig

    d = SynthConfig()
    p = subparsers.add_parser("synth", help="generate the synthetic multi-camera benchmark")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--identities", type=int, default=d.identities, help="target-domain people")
    p.add_argument("--source-identities", type=int, default=d.source_identities,
                   help="people in the neutral-camera `source` split (pre-training)")  # fmt: skip
    p.add_argument("--source-images", type=int, default=d.source_images,
                   help="crops per source identity")  # fmt: skip
    p.add_argument("--cameras", type=int, default=d.cameras, help="target cameras")
    p.add_argument("--nodes", type=int, default=d.nodes, help="edge nodes (disjoint cameras)")
    p.add_argument("--images-per-camera", type=int, default=d.images_per_camera,
                   help="crops of one person per camera visit")  # fmt: skip
    p.add_argument("--size", type=_size, default=d.size, help="crop size HxW (default 128x64)")
    p.add_argument("--shift", choices=("none", "mild", "strong"), default=d.shift,
                   help="per-camera appearance shift")  # fmt: skip
    p.add_argument("--looks", choices=sorted(LOOK_SETS), default=d.looks,
                   help="v4 two lights + exposure (default), v3 CCTV faults, v2 one light, "
                   "v5 hue turns, v6 hue turns over vivid scenes")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=None, help="render processes (default: CPUs)")
    p.add_argument("--preview", type=Path, default=None, help="also write a contact sheet PNG")
    p.set_defaults(func=_synth)

    from sims.pretrain import PretrainConfig

    d2 = PretrainConfig()
    q = subparsers.add_parser(
        "pretrain", help="train the base model on the benchmark's neutral `source` split"
    )
    q.add_argument("--data", required=True, type=Path, help="benchmark dir (fedretrieve synth)")
    q.add_argument("--out", type=Path, default=None,
                   help="model directory to write (default: build or reuse it in the cache "
                   "dir, $FEDRETRIEVE_CACHE or ~/.cache/fedretrieve)")  # fmt: skip
    q.add_argument("--model", default=d2.model, help="model config name to start from")
    q.add_argument("--epochs", type=int, default=d2.epochs)
    q.add_argument("--lr", type=float, default=d2.lr)
    q.add_argument("--batch-size", type=int, default=d2.batch_size)
    q.add_argument("--frozen-image-stages", type=int, default=d2.frozen_image_stages,
                   help="leading image-tower stages kept at their ImageNet start "
                   "(EfficientNet-Lite; 0: train the whole tower)")  # fmt: skip
    q.add_argument("--holdout", type=float, default=d2.holdout,
                   help="source identities held out for the source-test figures")  # fmt: skip
    q.add_argument("--seed", type=int, default=d2.seed)
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_pretrain)


def _synth(args: argparse.Namespace) -> int:
    from sims.synth.generate import SynthConfig, generate
    from sims.synth.preview import make_preview

    cfg = SynthConfig(
        identities=args.identities,
        source_identities=args.source_identities,
        source_images=args.source_images,
        cameras=args.cameras,
        nodes=args.nodes,
        images_per_camera=args.images_per_camera,
        size=args.size,
        shift=args.shift,
        looks=args.looks,
        seed=args.seed,
    )
    summary = generate(cfg, args.out, workers=args.workers)
    print(
        f"wrote {summary['images']} images to {args.out} "
        f"(per split {summary['images_per_split']}, "
        f"{summary['captions']['distinct']} distinct captions)"
    )
    if args.preview:
        print(f"preview: {make_preview(args.out, args.preview)}")
    return 0


def cache_dir_from_env() -> Path:
    """The base-model cache: $FEDRETRIEVE_CACHE or ~/.cache/fedretrieve (entry points only)."""
    return Path(os.environ.get("FEDRETRIEVE_CACHE", DEFAULT_CACHE)).expanduser()


def _pretrain(args: argparse.Namespace) -> int:
    import json

    from sims.pretrain import REPORT_FILE, PretrainConfig, ensure_base_model, pretrain

    params = dict(
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        frozen_image_stages=args.frozen_image_stages,
        holdout=args.holdout,
        seed=args.seed,
    )
    if args.out is None:
        out = ensure_base_model(
            args.data, cache_dir_from_env(), progress=not args.no_progress, **params
        )
        report = json.loads((out / REPORT_FILE).read_text())
    else:
        out = args.out
        report = pretrain(args.data, out, PretrainConfig(**params), progress=not args.no_progress)
    m = report["source_test"]
    figures = f"R1 {m['R1']:.2f}, mAP {m['mAP']:.2f}" if m else "no held-out identities"
    print(f"base model: {out} (source test: {figures}; trained in {report['train_seconds']} s)")
    print(f"use it anywhere with --model {out}")
    return 0
