"""Contrastive fine-tuning of a DualEncoder (LoRA or full), as in the seed paper.

Loss: symmetric cross-entropy over the batch's text-image similarities with an id-aware
target (every image of the caption's person is a positive, not just its own crop), so two
crops of one person in a batch are not pushed apart.

On CPU the text tower dominates the cost (DESIGN.md §8) while the camera shift lives in the
images. When the text tower has nothing to train, its pooled outputs are computed once per
distinct caption and kept in a `TextFeatureCache` the caller can reuse across rounds.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.camera_norm import CameraNorm
from common.datasets import Record
from common.errors import ConfigError
from common.model import DualEncoder, eval_mode
from common.prefix_cache import PrefixCache, image_features_fn
from common.preprocess import PreprocessCfg, load_image, normalize_uint8, resize_uint8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fine-tuning run (one Flower round on a node, or a baseline).

    schedule: cosine (with `warmup_steps`), plateau (halve on a flat epoch loss), constant.
    amp: none, fp16 or bf16 autocast; only used on CUDA.
    proximal_mu: FedProx term mu/2 * ||w - w_global||^2 over the trainable parameters.
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    hflip: bool = True
    proximal_mu: float = 0.0
    max_steps: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(
                "`epochs` must be >= 1 and `batch_size` >= 2 "
                f"(got {self.epochs}, {self.batch_size})"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"`lr` must be a positive number, got {self.lr}")
        if self.schedule not in ("cosine", "plateau", "constant"):
            raise ConfigError(
                f"`schedule` must be cosine, plateau or constant, got {self.schedule!r}"
            )
        if self.amp not in ("none", "fp16", "bf16"):
            raise ConfigError(f"`amp` must be none, fp16 or bf16, got {self.amp!r}")
        if self.proximal_mu < 0:
            raise ConfigError(f"`proximal_mu` must be >= 0, got {self.proximal_mu}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    steps: int = 0
    seconds: float = 0.0
    num_examples: int = 0  # image-caption pairs seen per epoch (FedAvg weights by it)


class ImageBank:
    """Every distinct image of a record list, resized once and kept as uint8 (n,H,W,3).

    With `camera_norm`, each image gets its camera's gains before the resize, so the pad
    colour stays neutral and the bank holds exactly what a normalising node would embed.
    """

    def __init__(
        self,
        records: Sequence[Record],
        cfg: PreprocessCfg,
        camera_norm: CameraNorm | None = None,
    ) -> None:
        camera = {r.image_path: r.camera_id for r in records}
        paths = sorted(camera)
        self.index = {p: i for i, p in enumerate(paths)}
        self.cfg = cfg
        norm = camera_norm or CameraNorm()
        arrays = [resize_uint8(norm.apply(load_image(p), camera[p]), cfg) for p in paths]
        h, w = cfg.size
        self.pixels = (
            torch.from_numpy(np.stack(arrays))
            if arrays
            else torch.empty(0, h, w, 3, dtype=torch.uint8)
        )
        # a frozen image-tower prefix's activations of these crops (common.prefix_cache)
        self.prefix_cache = PrefixCache(len(paths))

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        return normalize_uint8(self.pixels[idx].to(device), self.cfg)


class TextFeatureCache:
    """Pooled outputs of a frozen text tower, per caption, for one base model.

    The text tower is compute-bound on a CPU (about 6 ms per caption for MiniLM on 2 cores),
    so a simulation that fine-tunes in several processes saves the cache once (`save`) and
    every process starts from it (`load`) instead of encoding the same captions again.
    """

    FORMAT = 1

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.features: dict[str, torch.Tensor] = {}

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        captions = list(self.features)
        blob = {
            "format": self.FORMAT,
            "fingerprint": self.fingerprint,
            "captions": captions,
            "features": torch.stack([self.features[c] for c in captions])
            if captions
            else torch.empty(0),
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path | None, fingerprint: str) -> TextFeatureCache:
        """The cache saved at `path` if it is for this base model; else an empty one.

        Only a speed-up: a missing, foreign or unreadable file is logged and ignored.
        """
        cache = cls(fingerprint)
        if not path:
            return cache
        try:
            blob = torch.load(Path(path), map_location="cpu", weights_only=True)
            feats, captions = blob["features"], blob["captions"]
            if blob.get("format") != cls.FORMAT or blob.get("fingerprint") != fingerprint:
                log.info("text feature cache %s is for another model; not used", path)
            elif len(captions) != len(feats) or not torch.isfinite(feats).all():
                log.warning("text feature cache %s is inconsistent; not used", path)
            else:
                cache.features = dict(zip(captions, feats.float(), strict=True))
        except FileNotFoundError:
            log.info("text feature cache %s not found; encoding captions", path)
        except Exception as exc:  # corrupt, truncated, not a torch file
            log.warning("text feature cache %s unreadable (%s); not used", path, exc)
        return cache

    @classmethod
    def for_model(cls, model: DualEncoder, cache: TextFeatureCache | None) -> TextFeatureCache:
        """`cache` if it holds this model's caption features, else a new, empty one: a model
        with a merged text adapter shares the base fingerprint but not the base's features."""
        if cache is not None and cache.fingerprint == model.text_fingerprint:
            return cache
        return cls(model.text_fingerprint)

    def get(
        self, model: DualEncoder, captions: Sequence[str], batch_size: int = 128
    ) -> torch.Tensor:
        if model.text_fingerprint != self.fingerprint:
            raise ValueError("TextFeatureCache used with another text tower")
        todo = list(dict.fromkeys(c for c in captions if c not in self.features))
        # similar lengths per batch: padding to the longest caption was ~40% of the work
        todo.sort(key=len)
        with torch.no_grad(), eval_mode(model.text_tower):
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                feats = model.text_backbone(chunk).float().cpu()
                self.features.update(zip(chunk, feats, strict=True))
        if not captions:  # a gallery without captions (e.g. a node's own crops)
            return torch.empty(0, model.text_tower.width)
        return torch.stack([self.features[c] for c in captions])


def core_model(model: nn.Module) -> DualEncoder:
    """The DualEncoder inside a PeftModel (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_tower_frozen(model: DualEncoder) -> bool:
    """True when nothing in the text tower trains or carries LoRA, so its output is cacheable."""
    return not any(p.requires_grad or "lora_" in n for n, p in model.text_tower.named_parameters())


def set_trainable(model: DualEncoder, parts: Sequence[str]) -> None:
    """Full (non-LoRA) training of the named top-level parts, e.g. for pretraining."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".")[0] in parts)


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, pids: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with id-aware soft targets (all same-person pairs are positives)."""
    logits = scale * txt @ img.t()
    pos = (pids[:, None] == pids[None, :]).float()
    t2i = pos / pos.sum(1, keepdim=True)
    i2t = pos.t() / pos.t().sum(1, keepdim=True)
    loss_t = -(t2i * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_i = -(i2t * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (loss_t + loss_i) / 2


def train(
    model: nn.Module,
    records: Sequence[Record],
    cfg: TrainConfig,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    text_cache: TextFeatureCache | None = None,
    bank: ImageBank | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train whatever parameters of `model` require grad; return per-epoch losses.

    `reference` (name -> tensor, names as in `model.named_parameters()`) enables FedProx.
    """
    core = core_model(model)
    device = torch.device(cfg.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            "nothing to train: no parameter requires grad "
            "(attach a LoRA adapter or call set_trainable)"
        )
    pairs = [(r.image_path, c, r.person_id) for r in records for c in r.captions]
    if len(pairs) < 2:
        raise ConfigError(f"need at least 2 image-caption pairs to train, got {len(pairs)}")
    bank = bank or ImageBank(records, core.preprocess)
    img_idx = torch.tensor([bank.index[p] for p, _, _ in pairs])
    captions = [c for _, c, _ in pairs]
    pids = torch.tensor([pid for _, _, pid in pairs])
    cached = text_tower_frozen(core)
    if cached:
        text_cache = TextFeatureCache.for_model(core, text_cache)
        text_feats = text_cache.get(core, captions).to(device)

    image_features = image_features_fn(core, bank, device)  # reuses a frozen prefix's output
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _scheduler(opt, cfg, total)
    prox = {
        n: reference[n].to(device)
        for n, p in model.named_parameters()
        if p.requires_grad and reference is not None and n in reference
    }
    use_amp = device.type == "cuda" and cfg.amp != "none"
    amp_dtype = torch.float16 if cfg.amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp == "fp16")

    result, start = TrainResult(num_examples=len(pairs)), time.perf_counter()
    # Dropout draws from the global RNG: seed it for reproducible runs, then restore it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model.train()
        _freeze_batchnorm(model)
        bar = tqdm(total=total, desc=desc, disable=None if cfg.progress else True, leave=False)
        for _epoch in range(cfg.epochs):
            order = torch.randperm(len(pairs), generator=gen)
            epoch_loss, n = 0.0, 0
            for s in range(0, len(pairs), cfg.batch_size):
                batch = order[s : s + cfg.batch_size]
                if len(batch) < 2:
                    continue
                flip = torch.rand(len(batch), generator=gen) < 0.5 if cfg.hflip else None
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    img = F.normalize(image_features(img_idx[batch], flip), dim=-1)
                    if cached:
                        txt = core.text_proj(text_feats[batch])
                    else:
                        txt = core.text_features([captions[i] for i in batch.tolist()])
                    txt = F.normalize(txt, dim=-1)
                    scale = core.logit_scale.exp().clamp(max=100.0)
                    loss = contrastive_loss(img.float(), txt.float(), pids[batch].to(device), scale)
                    if prox and cfg.proximal_mu > 0:
                        loss = loss + cfg.proximal_mu / 2 * sum(
                            (p - prox[name]).pow(2).sum()
                            for name, p in model.named_parameters()
                            if name in prox
                        )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{desc}: loss became {loss.item()} at step "
                        f"{result.steps}; lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                if cfg.schedule != "plateau":
                    sched.step()
                epoch_loss += loss.item() * len(batch)
                n += len(batch)
                result.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if cfg.max_steps is not None and result.steps >= cfg.max_steps:
                    break
            result.losses.append(epoch_loss / max(n, 1))
            if cfg.schedule == "plateau":
                sched.step(result.losses[-1])
            if cfg.max_steps is not None and result.steps >= cfg.max_steps:
                break
        bar.close()
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int):
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return cosine_schedule(opt, total, cfg.warmup_steps)


def cosine_schedule(opt: torch.optim.Optimizer, total: int, warmup_steps: int = 0):
    """Linear warm-up, then cosine decay to 0 at step `total`: every training loop's
    default (fine-tuning, distillation, self-training)."""

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def _freeze_batchnorm(model: nn.Module) -> None:
    """Frozen BatchNorm layers (e.g. in a pretrained ResNet) keep their running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()
