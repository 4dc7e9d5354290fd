"""Pre-train the offline default's base model on the benchmark's neutral `source` split.

No pretrained person-retrieval model can be had offline, so this plays the part that
pretrained CLIP plays in a real deployment: a model that is decent on neutral cameras and
worse on the shifted target cameras, which the federated LoRA rounds then adapt. The MiniLM
text tower stays frozen (its features are computed once per caption); the image tower
(ImageNet EfficientNet-Lite0 for `default`, a CNN from scratch for `cnn`), the projections
and the temperature train in full.

`ensure_base_model` builds it once per (config, data) and reuses it from a cache dir, so
the demo and the simulation do not pay for it twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.datasets import Record, load_records
from common.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the way a base model is built changes
REPORT_FILE = "pretrain.json"
DEFAULT_CACHE_DIR = Path("~/.cache/fedretrieve")


@dataclass(frozen=True)
class PretrainConfig:
    """How the base model is trained; part of its cache key."""

    model: str = "default"  # a model config name (see `common.factory.list_models`)
    # sized for `default` (ImageNet EfficientNet-Lite0 start): 4 epochs, source R1 52.4 in 212 s
    # on a 2-core EPYC. The `cnn` tower starts from scratch and needs 12 (R1 25.6 in 183 s).
    epochs: int = 4
    lr: float = 5e-4  # cnn, 3 epochs, source R1: 5e-4 11.3, 1e-3 6.9, 2e-3 5.9, 5e-3 1.2
    batch_size: int = 64
    holdout: float = 0.15  # fraction of source identities kept out for the source-test figures
    seed: int = 0
    trainable: tuple[str, ...] = ("image_tower", "image_proj", "text_proj", "logit_scale")
    # leading image-tower stages (stem, blocks) kept at their ImageNet start: their output is
    # then computed once per crop (common/prefix_cache.py). default, 4 epochs: 0 -> source R1
    # 52.44 in 221 s, 6 (stem + blocks 0-4) -> 50.89 in 162 s, 9 -> 48.67 in 146 s, 12 -> 36.67
    # in 89 s. Towers without stages (the CNN, from scratch: nothing pretrained to keep) train
    # in full whatever this says.
    frozen_image_stages: int = 6

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"`epochs` must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"`lr` must be > 0, got {self.lr}")
        if self.batch_size < 2:
            raise ConfigError(f"`batch_size` must be >= 2, got {self.batch_size}")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"`holdout` must be in [0, 1), got {self.holdout}")
        if self.frozen_image_stages < 0:
            raise ConfigError(f"`frozen_image_stages` must be >= 0, got {self.frozen_image_stages}")
        if not self.trainable:
            raise ConfigError("`trainable` is empty: pre-training would train nothing")


def split_source(records: list[Record], holdout: float, seed: int) -> tuple[list, list]:
    """(train, held-out) source records, disjoint by person id, chosen by `seed`."""
    ids = sorted({r.person_id for r in records})
    n_hold = round(len(ids) * holdout)
    if holdout > 0 and len(ids) - n_hold < 2:
        raise DatasetError(f"only {len(ids)} source identities: too few to hold {holdout:.0%} out")
    held = set(np.random.default_rng(seed).permutation(ids)[:n_hold].tolist())
    return [r for r in records if r.person_id not in held], [
        r for r in records if r.person_id in held
    ]


def source_records(data_dir: str | Path) -> list[Record]:
    records = load_records(data_dir, split="source")
    if not records:
        raise DatasetError(
            f"{data_dir}: no `source` split; generate the benchmark with "
            "`fedretrieve synth --source-identities N` (N > 0)"
        )
    return records


def pretrain(
    data_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig | None = None, *, progress=True
) -> dict:
    """Train on the source split, save with `save_model`, return (and write) a report."""
    from common.evaluate import evaluate
    from common.factory import create_model, save_model
    from common.train import TextFeatureCache, TrainConfig, set_trainable, train

    cfg = cfg or PretrainConfig()
    start = time.perf_counter()
    train_recs, held_recs = split_source(source_records(data_dir), cfg.holdout, cfg.seed)
    model = create_model(cfg.model)
    set_trainable(model, cfg.trainable)
    frozen = freeze_image_stages(model, cfg.frozen_image_stages)
    cache = TextFeatureCache(model.text_fingerprint)
    tcfg = TrainConfig(
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        progress=progress,
        warmup_steps=20,
    )
    result = train(model, train_recs, tcfg, text_cache=cache, desc="pretrain")
    metrics = evaluate(model, held_recs, text_cache=cache) if held_recs else {}
    out = save_model(model, out_dir, name=f"{cfg.model}-base")
    report = {
        "config": asdict(cfg),
        "data": str(Path(data_dir).resolve()),
        "frozen_image_stages": frozen,
        "train_images": len(train_recs),
        "train_identities": len({r.person_id for r in train_recs}),
        "heldout_images": len(held_recs),
        "losses": [round(x, 4) for x in result.losses],
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "source_test": {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()},
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    log.info("pretrain: %s, source test %s", out, report["source_test"])
    return report


def freeze_image_stages(model, stages: int) -> int:
    """Keep the image tower's first `stages` stages at their start weights; how many it froze
    (0 for a tower without stages)."""
    tower = model.image_tower
    if not stages or not hasattr(tower, "stage_count"):
        return 0
    stages = min(stages, tower.stage_count())
    for _, tensor in tower.prefix_state(stages):
        tensor.requires_grad_(False)
    return stages


def data_fingerprint(data_dir: str | Path) -> str:
    """sha256 over annotations.json and the bytes of every source image (the training data)."""
    data = Path(data_dir)
    ann = data / "annotations.json"
    if not ann.is_file():
        raise DatasetError(f"{ann} not found: generate the benchmark with `fedretrieve synth`")
    digest = hashlib.sha256(ann.read_bytes())
    for rec in sorted(source_records(data), key=lambda r: str(r.image_path)):
        digest.update(rec.image_path.read_bytes())
    return digest.hexdigest()


def base_model_key(data_dir: str | Path, cfg: PretrainConfig) -> str:
    from common.factory import get_model_config

    _, model_spec, _ = get_model_config(cfg.model)
    blob = json.dumps(
        {"format": CACHE_FORMAT, "cfg": asdict(cfg), "model": model_spec}, sort_keys=True
    )
    return hashlib.sha256((blob + data_fingerprint(data_dir)).encode()).hexdigest()[:16]


def ensure_base_model(
    data_dir: str | Path, cache_dir: str | Path | None = None, *, progress: bool = True, **cfg
) -> Path:
    """The pre-trained base model for (config, data): reused from `cache_dir` or built there.

    `cache_dir` defaults to ~/.cache/fedretrieve (entry points pass $FEDRETRIEVE_CACHE).
    The model is built in a temporary sibling directory and renamed into place, so a crash
    or a concurrent builder never leaves a half-written model behind.
    """
    config = PretrainConfig(**cfg)
    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / "base-models"
    key = base_model_key(data_dir, config)
    final = root / f"{config.model}-{key}"
    if (final / REPORT_FILE).is_file():
        log.info("base model: reusing %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pretrain(data_dir, tmp, config, progress=progress)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / REPORT_FILE).is_file():  # not a concurrent builder's success
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
