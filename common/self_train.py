"""Training on crops without captions: pseudo-identities plus an anchor to the text space.

Without captions nothing ties the image space to the frozen text tower any more, so a loss
that only pulls same-person crops together may drift away from what queries look like.
Two terms, and an optional third:
- supervised contrastive (SupCon, Khosla et al. 2020) over the pseudo-identities mined on
  the node (`edge_node.fl.mining`): crops of one pseudo-identity together, others apart.
  This is what can teach camera invariance: a person's visits to two cameras pulled
  together.
- anchor: 1 - cos(image embedding, the round's starting global model's embedding of the
  same crop), which keeps every crop near where the text-aligned model put it.
- text (`SelfTrainWeights.text`): each crop's scores over an attribute vocabulary match its
  pseudo-identity's (`common.pseudo_captions`), an anchor in the text tower's own terms.
- cluster (`SelfTrainWeights.cluster`): a memory of every pseudo-identity's centroid, each
  crop classified against all of them (ClusterContrast, Dai et al. 2022). A batch holds a
  few identities only, so the SupCon term sees few negatives; the memory brings the node's
  other identities in, updated with momentum from the crops the batch embedded.
Batches are filled with whole pseudo-identities so every crop has its positives in them.
Memories other nodes shared (`share-memories`) that joined a local pseudo-identity enter
the SupCon term as fixed keys of that identity: another site's view of the same person.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.datasets import Record
from common.errors import ConfigError
from common.prefix_cache import image_features_fn
from common.pseudo_captions import PseudoCaptions
from common.train import ImageBank, TrainConfig, TrainResult, core_model, cosine_schedule


@dataclass(frozen=True)
class SelfTrainWeights:
    temperature: float = 0.1
    anchor: float = 1.0
    camera: float = 0.0  # pull every camera's mean embedding to the batch's mean
    text: float = 0.0  # match each crop's pseudo-caption (common.pseudo_captions)
    cluster: float = 0.0  # classify each crop against every pseudo-identity's centroid
    momentum: float = 0.2  # of the centroid memory: share of the old centroid kept per update

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not self.anchor >= 0 or not self.text >= 0:
            raise ConfigError("self-training: temperature must be > 0, anchor and text >= 0")
        if not self.cluster >= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("self-training: cluster must be >= 0, momentum in [0, 1)")


def supcon_loss(
    img: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    keys: torch.Tensor | None = None,
    key_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over crops with at least one positive of -log softmax mass on their positives;
    `keys` (fixed unit rows with `key_ids`) are candidates beside the batch's own crops."""
    cand, cand_ids = img, ids
    if keys is not None and key_ids is not None and len(keys):
        cand, cand_ids = torch.cat([img, keys]), torch.cat([ids, key_ids])
    logits = img @ cand.t() / temperature
    eye = torch.zeros(len(ids), len(cand_ids), dtype=torch.bool, device=img.device)
    eye[:, : len(ids)] = torch.eye(len(ids), dtype=torch.bool, device=img.device)
    logits = logits.masked_fill(eye, float("-inf"))
    pos = (ids[:, None] == cand_ids[None, :]) & ~eye
    has = pos.any(1)
    if not has.any():
        return img.sum() * 0.0
    log_prob = F.log_softmax(logits, dim=1).masked_fill(~pos, 0.0)
    return -(log_prob.sum(1)[has] / pos.sum(1)[has]).mean()


def camera_alignment(img: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each camera's mean embedding in the batch to the batch mean:
    a camera's look shifts all its crops the same way, which this undoes label-free."""
    centre = img.mean(0)
    terms = [(img[cameras == c].mean(0) - centre).pow(2).sum() for c in torch.unique(cameras)]
    return torch.stack(terms).mean()


class CentroidMemory:
    """Unit centroids of the pseudo-identities, started from `features` (the round model's
    embeddings) and moved towards each batch's crops: the ClusterContrast memory."""

    def __init__(self, features: torch.Tensor, ids: torch.Tensor, momentum: float) -> None:
        self.labels, inverse = torch.unique(ids, return_inverse=True)
        self.code = inverse  # per record: its identity's row
        sums = torch.zeros(len(self.labels), features.shape[1]).index_add_(0, inverse, features)
        self.rows = F.normalize(sums, dim=-1)
        self.momentum = momentum

    def loss(self, img: torch.Tensor, batch: torch.Tensor, temperature: float) -> torch.Tensor:
        rows = self.rows.to(img.device)
        return F.cross_entropy(img @ rows.t() / temperature, self.code[batch].to(img.device))

    @torch.no_grad()
    def update(self, img: torch.Tensor, batch: torch.Tensor) -> None:
        code = self.code[batch]
        for c in torch.unique(code):
            mean = img[(code == c).to(img.device)].detach().float().mean(0).cpu()
            self.rows[c] = F.normalize(
                self.momentum * self.rows[c] + (1 - self.momentum) * mean, dim=0
            )


def _batches(ids: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    groups = [torch.nonzero(ids == g).flatten() for g in torch.unique(ids)]
    order = torch.randperm(len(groups), generator=gen).tolist()
    out, current = [], []
    for g in order:
        members = groups[g][:batch_size]
        if current and sum(map(len, current)) + len(members) > batch_size:
            out.append(torch.cat(current))
            current = []
        current.append(members)
    if current:
        out.append(torch.cat(current))
    return [b for b in out if len(b) >= 2]


def self_train(
    model: torch.nn.Module,
    records: Sequence[Record],
    pseudo_ids: Sequence[int],
    anchors: torch.Tensor,
    cfg: TrainConfig,
    weights: SelfTrainWeights = SelfTrainWeights(),
    *,
    bank: ImageBank | None = None,
    captions: PseudoCaptions | None = None,
    keys: tuple[torch.Tensor, Sequence[int]] | None = None,
    features: torch.Tensor | None = None,
) -> TrainResult:
    """Train whatever requires grad (the LoRA adapter) on uncaptioned `records`, in bank
    order of their images, with `pseudo_ids`, `anchors` (unit rows) and, for the text term,
    `captions` aligned to them. `keys`: (unit rows, the pseudo-id of each), e.g. shared
    memories, fixed positives of their identity in every batch that holds it. `features`:
    the round model's unit embeddings of `records`, the cluster term's starting centroids
    (the anchors when not given)."""
    core = core_model(model)
    device = torch.device(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: attach a LoRA adapter first")
    bank = bank or ImageBank(records, core.preprocess)
    idx = torch.tensor([bank.index[r.image_path] for r in records])
    ids = torch.as_tensor(list(pseudo_ids))
    codes = {c: i for i, c in enumerate(sorted({r.camera_id for r in records}))}
    cameras = torch.tensor([codes[r.camera_id] for r in records]) if len(codes) > 1 else None
    if len(ids) != len(records) or len(anchors) != len(records):
        raise ConfigError("self-training: one pseudo-id and one anchor per record")
    if weights.text and (captions is None or len(captions.targets) != len(records)):
        raise ConfigError("self-training: the text term needs one pseudo-caption per record")
    key_rows, key_ids = None, None
    if keys is not None:
        key_rows, key_ids = keys[0].float(), torch.as_tensor(list(keys[1]), dtype=torch.long)
        if key_rows.ndim != 2 or len(key_rows) != len(key_ids):
            raise ConfigError("self-training: one pseudo-id per key row")
    memory = None
    if weights.cluster:
        start_rows = anchors if features is None else features
        if len(start_rows) != len(records):
            raise ConfigError("self-training: one feature row per record for the cluster term")
        memory = CentroidMemory(start_rows.float(), ids, weights.momentum)
    image_features = image_features_fn(core, bank, device)  # a frozen prefix: cached
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(records) / cfg.batch_size) * cfg.epochs
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    sched = cosine_schedule(opt, steps)
    result, start = TrainResult(num_examples=len(records)), time.perf_counter()
    model.train()
    for _epoch in range(cfg.epochs):
        total, seen = 0.0, 0
        for batch in _batches(ids, cfg.batch_size, gen):
            img = F.normalize(image_features(idx[batch], None), dim=-1)
            batch_ids = ids[batch].to(device)
            in_batch = None
            if key_rows is not None and key_ids is not None:
                mask = torch.isin(key_ids, ids[batch])
                in_batch = (key_rows[mask].to(device), key_ids[mask].to(device))
            loss = supcon_loss(img, batch_ids, weights.temperature, *(in_batch or ()))
            if weights.anchor:
                anchor = anchors[batch].to(device)
                loss = loss + weights.anchor * (1 - (img * anchor).sum(-1)).mean()
            if weights.text and captions is not None:
                loss = loss + weights.text * captions.loss(img, batch)
            if memory is not None:
                loss = loss + weights.cluster * memory.loss(img, batch, weights.temperature)
            if weights.camera and cameras is not None:
                loss = loss + weights.camera * camera_alignment(img, cameras[batch].to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"self-training loss became {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if memory is not None:
                memory.update(img, batch)
            total += loss.item() * len(batch)
            seen += len(batch)
            result.steps += 1
            if cfg.max_steps is not None and result.steps >= cfg.max_steps:
                break
        result.losses.append(total / max(seen, 1))
        if cfg.max_steps is not None and result.steps >= cfg.max_steps:
            break
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
