"""Activations of a frozen image-tower prefix, computed once per crop and view.

LoRA on the late layers (`image-late`, the default's preset) leaves the stem and the first
eleven blocks of EfficientNet-Lite0 frozen, BatchNorm runs on fixed statistics and there
is no dropout: what those layers give for one crop never changes while the adapter trains,
from epoch to epoch or from round to round. Recomputing it was about 60% of a training
step on a 2-core CPU (batch 32 at 128x64: 0.14 s for the whole step, 0.06 s for the part
after block 10), and the same share of every evaluation of a new adapter on the same
gallery. So an `ImageBank` keeps those activations, filled lazily, one slot per crop and
view (as stored, mirrored), keyed by the prefix depth and a digest of the prefix weights:
a bank shared by models with other frozen weights (another base, a fully fine-tuned
tower) never hands them stale activations.

A tower opts in with `frozen_depth()`, `run_prefix(pixels, depth)` and
`forward_from(h, depth)`; towers without them (the CNN, CLIP's ViT) take the plain path.
The cache gives up (plain path) beyond `max_bytes`, e.g. a site with 100k crops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MAX_BYTES = 512 * 2**20


@dataclass
class PrefixStore:
    """One depth and weight digest's activations for every slot (2 per crop) of a bank."""

    values: torch.Tensor  # (2 * crops, *activation shape), float32
    filled: torch.Tensor  # (2 * crops,) bool


@dataclass
class PrefixCache:
    """Owned by an ImageBank: one store, for the (depth, prefix digest, device) `key` last
    asked for (a new key replaces it); `store` None with a key: too big, not cached."""

    crops: int
    max_bytes: int = MAX_BYTES
    key: tuple | None = None
    store: PrefixStore | None = None


def frozen_depth(tower: nn.Module) -> int:
    """Leading stages of `tower` with nothing that trains (0: no cacheable prefix)."""
    depth = getattr(tower, "frozen_depth", None)
    return depth() if callable(depth) else 0


def prefix_digest(tower: nn.Module, depth: int) -> str:
    """sha1 of the prefix's parameters and buffers: the cache key's weights part."""
    h = hashlib.sha1(str(depth).encode())
    for name, tensor in tower.prefix_state(depth):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def image_features_fn(
    core: nn.Module, bank, device: torch.device | str
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """f(idx, flip) = core.image_features(bank.batch(idx) mirrored where flip), reusing
    the bank's cached prefix activations when the image tower's prefix is frozen.

    Build it once per training or evaluation pass (it digests the prefix weights); the
    prefix must not change while it is in use, which holds for anything that trains
    only what requires grad (a frozen stage has no parameter that does)."""
    tower = core.image_tower
    depth = frozen_depth(tower)

    def plain(idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        px = bank.batch(idx, device)
        if flip is not None and bool(flip.any()):
            mask = flip.to(px.device)
            px[mask] = px[mask].flip(-1)
        return core.image_features(px)

    cache: PrefixCache | None = getattr(bank, "prefix_cache", None)
    if depth == 0 or cache is None or cache.crops == 0:
        return plain
    key = (depth, prefix_digest(tower, depth), str(device))

    def cached(idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        if cache.key == key and cache.store is None:
            return plain(idx, flip)  # too big for this bank
        view = flip.long().cpu() if flip is not None else torch.zeros(len(idx), dtype=torch.long)
        slots = idx.cpu() * 2 + view
        store = cache.store if cache.key == key else None
        missing = slots if store is None else slots[~store.filled[slots]]
        if len(missing):
            missing = torch.unique(missing)
            px = bank.batch(missing // 2, device)
            mirror = (missing % 2 == 1).to(px.device)
            px[mirror] = px[mirror].flip(-1)
            with torch.no_grad():
                acts = tower.run_prefix(px, depth).float()
            if store is None:
                size = 2 * cache.crops * acts[0].numel() * acts.element_size()
                cache.key, cache.store = (
                    key,
                    (
                        PrefixStore(
                            torch.empty(2 * cache.crops, *acts.shape[1:], device=acts.device),
                            torch.zeros(2 * cache.crops, dtype=torch.bool),
                        )
                        if size <= cache.max_bytes
                        else None  # too big for this bank: the plain path from now on
                    ),
                )
            store = cache.store
            if store is None:
                return core.image_proj(tower.forward_from(_restore(acts, missing, slots), depth))
            store.values[missing.to(store.values.device)] = acts
            store.filled[missing] = True
        h = store.values[slots.to(store.values.device)]
        return core.image_proj(tower.forward_from(h, depth))

    return cached


def _restore(acts: torch.Tensor, unique: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of `acts` (one per sorted unique slot) in the order of `slots`."""
    return acts[torch.searchsorted(unique, slots).to(acts.device)]
