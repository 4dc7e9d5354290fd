"""Distil a served model (the teacher) into a smaller image tower (the student).

Why: a GPU-less box beside an old camera cannot run the teacher's image tower fast enough,
but queries are text, and the text side is cheap and done once per query (by the broker).
So the student keeps the teacher's text tower and text projection unchanged and learns only
to put crops where the teacher puts them: its embeddings live in the teacher's space, a
query vector the broker made with the teacher searches a student's index, and scores can be
compared across the two.

Loss: feature mimicry, 1 - cos(student(x), teacher(x)) per crop (both towers see the same
crop, each at its own input size), the strongest single CLIP distillation signal reported
(CLIP-KD, Yang et al. 2024); optionally, for crops that have captions, the contrastive loss
against the frozen text tower (off by default: it hurt here, see `DistillConfig`).
Targets need no labels: a node can distil on its own gallery crops; no image leaves it.

Checked, not assumed (`image_agreement`): the broker verifies a student node by the mean
cosine between its embeddings and its own model's of the same crops (server/broker/students.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.datasets import Record
from common.errors import ConfigError
from common.evaluate import embed_records
from common.factory import build_image_tower, get_model_config, save_model
from common.model import DualEncoder, eval_mode
from common.preprocess import PreprocessCfg
from common.train import (
    ImageBank,
    TextFeatureCache,
    TrainResult,
    contrastive_loss,
    cosine_schedule,
)


@dataclass(frozen=True)
class DistillConfig:
    """`text_weight`: weight of the contrastive term on captioned crops. Default 0, mimicry
    only: on the demo's data it cost R1 (student-s4, 20 epochs on the source split: weight 0
    11.24, 0.1 10.33, 0.5 6.47; the teacher 15.15), since captions of neutral source crops
    pull the student towards a source-optimal space, away from the adapted teacher's."""

    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    text_weight: float = 0.0
    hflip: bool = True
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(
                f"`epochs` must be >= 1 and `batch_size` >= 2 (got {self.epochs}, "
                f"{self.batch_size})"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"`lr` must be a positive number, got {self.lr}")
        if not self.text_weight >= 0:
            raise ConfigError(f"`text_weight` must be >= 0, got {self.text_weight}")


def teacher_record(teacher: DualEncoder) -> dict:
    """What a student's model directory says about its teacher (`save_model(teacher=...)`).

    `model_version` is the query space: vectors the broker makes with this version are
    valid queries for the student."""
    return {
        "model_version": teacher.version,
        "fingerprint": teacher.fingerprint,
        "name": teacher.name,
        "embed_dim": teacher.embed_dim,
    }


def make_student(
    teacher: DualEncoder, image: dict, preprocess: dict | None = None, *, seed: int = 0
) -> DualEncoder:
    """A DualEncoder with a new image tower (`image`: the `image` table of a model config)
    and the teacher's text tower, text projection and temperature, copied and frozen."""
    spec = copy.deepcopy(teacher.spec)
    spec["image"] = copy.deepcopy(image)
    if preprocess:
        spec["preprocess"] = {**teacher.preprocess.to_dict(), **preprocess}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = build_image_tower(image, name=f"{teacher.name}-student", source=None)
        student = DualEncoder(
            tower,
            copy.deepcopy(teacher.text_tower),
            embed_dim=teacher.embed_dim,
            preprocess=PreprocessCfg.from_dict(spec["preprocess"]),
            name=f"{teacher.name}-student",
            spec=spec,
            text_proj=copy.deepcopy(teacher.text_proj),
            logit_scale=float(teacher.logit_scale.detach()),
        )
    student.teacher = teacher_record(teacher)
    return student


def student_from_config(teacher: DualEncoder, spec: str | Path, *, seed: int = 0) -> DualEncoder:
    """`make_student` with the image tower and input size of a model config (a name such as
    `student-3stage`, or a JSON file), named `<config>-of-<teacher>`."""
    name, config, _ = get_model_config(spec)
    student = make_student(teacher, config["image"], config.get("preprocess"), seed=seed)
    student.name = f"{Path(name).name}-of-{teacher.name.split('/')[-1]}"
    return student


@torch.no_grad()
def teacher_targets(
    teacher: DualEncoder, bank: ImageBank, batch_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's unit embeddings of every bank image, as is and mirrored (the student
    trains on both, so a flipped crop gets the flipped crop's target, not the original's)."""
    device = teacher.logit_scale.device
    plain, mirrored = [], []
    with eval_mode(teacher):
        for i in range(0, len(bank.pixels), batch_size):
            px = bank.batch(torch.arange(i, min(i + batch_size, len(bank.pixels))), device)
            plain.append(F.normalize(teacher.image_features(px).float(), dim=-1).cpu())
            mirrored.append(F.normalize(teacher.image_features(px.flip(-1)).float(), dim=-1).cpu())
    empty = torch.empty(0, teacher.embed_dim)
    return torch.cat([empty, *plain]), torch.cat([empty, *mirrored])


def trainable_student_parts(student: DualEncoder) -> list[torch.nn.Parameter]:
    """Image tower and image projection train; the text side stays the teacher's."""
    params = []
    for name, param in student.named_parameters():
        param.requires_grad_(name.split(".")[0] in ("image_tower", "image_proj"))
        if param.requires_grad:
            params.append(param)
    return params


def distill(
    student: DualEncoder,
    teacher: DualEncoder,
    records: Sequence[Record],
    cfg: DistillConfig,
    *,
    text_cache: TextFeatureCache | None = None,
    desc: str = "distill",
) -> TrainResult:
    """Train the student's image side on `records` (captions optional) towards the teacher."""
    if not records:
        raise ConfigError("distillation needs at least one crop")
    device = torch.device(cfg.device)
    student.to(device)
    teacher.to(device)
    params = trainable_student_parts(student)
    student_bank = ImageBank(records, student.preprocess)
    plain, mirrored = teacher_targets(teacher, ImageBank(records, teacher.preprocess))
    n = len(student_bank.pixels)
    caption_of = _one_caption_per_image(records, student_bank)
    use_text = cfg.text_weight > 0 and any(c is not None for c in caption_of)
    if use_text:
        captioned = [i for i, c in enumerate(caption_of) if c is not None]
        cache = TextFeatureCache.for_model(teacher, text_cache)
        feats = cache.get(teacher, [caption_of[i] for i in captioned])
        text_feats = torch.zeros(n, feats.shape[1])
        text_feats[captioned] = feats
        has_text = torch.zeros(n, dtype=torch.bool)
        has_text[captioned] = True
        pid_of = {r.image_path: r.person_id for r in records}
        pids = torch.tensor(
            [pid_of[p] for p in sorted(student_bank.index, key=student_bank.index.get)]
        )

    gen = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(n / cfg.batch_size) * cfg.epochs
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, steps)
    result, start = TrainResult(num_examples=n), time.perf_counter()
    student.train()
    bar = tqdm(total=steps, desc=desc, disable=None if cfg.progress else True, leave=False)
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for s in range(0, n, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            if len(idx) < 2:
                continue
            px = student_bank.batch(idx, device)
            target = plain[idx].clone()
            if cfg.hflip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                px[flip.to(device)] = px[flip.to(device)].flip(-1)
                target[flip] = mirrored[idx][flip]
            img = F.normalize(student.image_features(px), dim=-1)
            loss = (1 - (img * target.to(device)).sum(-1)).mean()
            if use_text and int(has_text[idx].sum()) >= 2:
                keep = has_text[idx].to(device)
                txt = F.normalize(student.text_proj(text_feats[idx].to(device)), dim=-1)
                scale = student.logit_scale.exp().clamp(max=100.0).detach()
                loss = loss + cfg.text_weight * contrastive_loss(
                    img[keep], txt[keep], pids[idx].to(device)[keep], scale
                )
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: loss became {loss.item()} at step {result.steps}; "
                    "lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            result.steps += 1
            bar.update(1)
        result.losses.append(total / max(seen, 1))
    bar.close()
    student.eval()
    result.seconds = time.perf_counter() - start
    return result


def _one_caption_per_image(records: Sequence[Record], bank: ImageBank) -> list[str | None]:
    """Bank order -> the image's first caption (None when it has none)."""
    out: list[str | None] = [None] * len(bank.index)
    for r in records:
        if r.captions and out[bank.index[r.image_path]] is None:
            out[bank.index[r.image_path]] = r.captions[0]
    return out


def embedding_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-crop cosine between two models' unit embeddings of the same crops (rows in the
    same order): how far a student sits from its teacher's space (1.0: identical)."""
    cos = (np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)).sum(-1)
    if not len(cos):
        raise ConfigError("image agreement needs at least one crop")
    return {
        "crops": len(cos),
        "cos_mean": float(cos.mean()),
        "cos_p05": float(np.quantile(cos, 0.05)),
    }


def image_agreement(a: DualEncoder, b: DualEncoder, records: Sequence[Record]) -> dict:
    """`embedding_agreement` of two models on the crops of `records`."""
    crops = [dataclasses.replace(r, captions=()) for r in records]
    return embedding_agreement(embed_records(a, crops).gallery, embed_records(b, crops).gallery)


def evaluate_against_teacher(
    teacher: DualEncoder, model: DualEncoder, records: Sequence[Record]
) -> dict:
    """R1/mAP of the teacher and of its student (or pruned copy) on `records`, and their
    agreement; each model embeds the crops once, and the captions are encoded once, by the
    teacher, since the student's text side is the teacher's."""
    from common.metrics import retrieval_metrics

    ref = embed_records(teacher, records)
    crops = [dataclasses.replace(r, captions=()) for r in records]
    gallery = embed_records(model, crops).gallery  # same sorted-path order as ref.gallery

    def scores(g: np.ndarray) -> dict:
        return retrieval_metrics(ref.queries @ g.T, ref.query_ids, ref.gallery_ids)

    return {
        "teacher": scores(ref.gallery),
        "model": scores(gallery),
        "agreement": embedding_agreement(ref.gallery, gallery),
    }


def save_student(student: DualEncoder, out_dir: str | Path, *, report: dict | None = None) -> Path:
    """A model directory the factory loads like any other, naming its teacher."""
    return save_model(student, out_dir, teacher=student.teacher, report=report)
