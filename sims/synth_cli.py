"""`fedretrieve synth` (generate the benchmark) and `fedretrieve pretrain` (base model)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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
    p.add_argument("--cameras", type=int, default=d.cameras, help="target cameras")
    p.add_argument("--nodes", type=int, default=d.nodes, help="edge nodes (disjoint cameras)")
    p.add_argument("--images-per-camera", type=int, default=d.images_per_camera,
                   help="crops of one person per camera visit")  # fmt: skip
    p.add_argument("--size", type=_size, default=d.size, help="crop size HxW (default 128x64)")
    p.add_argument("--shift", choices=("none", "mild", "strong"), default=d.shift,
                   help="per-camera appearance shift")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=None, help="render processes (default: CPUs)")
    p.add_argument("--preview", type=Path, default=None, help="also write a contact sheet PNG")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from sims.synth.generate import SynthConfig, generate
    from sims.synth.preview import make_preview

    cfg = SynthConfig(
        identities=args.identities,
        source_identities=args.source_identities,
        cameras=args.cameras,
        nodes=args.nodes,
        images_per_camera=args.images_per_camera,
        size=args.size,
        shift=args.shift,
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
