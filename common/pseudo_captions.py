"""Pseudo-captions: what the frozen text tower says a pseudo-identity wears.

Without captions, SupCon over pseudo-identities only shapes the image space, and the anchor
only holds each crop where the base model put it; neither says anything the text tower can
read. A pseudo-caption does: each pseudo-identity's memory (the mean embedding of its crops,
other frames and poses, and other cameras where mining linked them) is scored against a
vocabulary of attribute phrases, one softmax per slot (upper garment, lower garment, bag,
...), and every crop of the identity learns to give the same scores. A memory averages away
what one crop gets wrong, so its description is the better one, and the loss is measured in
the text tower's own terms: the space queries arrive in.

The vocabulary is a generic pedestrian-attribute one (PETA's eleven colours; common
garments and bags), not any benchmark's caption words; soft targets rather than one
phrase, because a memory is often torn between two colours of one garment.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# PETA's colour attributes (Deng et al., "Pedestrian attribute recognition at far distance").
COLOURS = (
    "black",
    "blue",
    "brown",
    "green",
    "grey",
    "orange",
    "pink",
    "purple",
    "red",
    "white",
    "yellow",
)
UPPER = ("t-shirt", "shirt", "jacket", "coat", "hoodie", "sweater", "dress")
LOWER = ("trousers", "jeans", "shorts", "skirt")
BAGS = ("backpack", "handbag", "shoulder bag")


def vocabulary() -> dict[str, tuple[str, ...]]:
    """Slot -> the phrases that compete in it (one softmax per slot)."""
    return {
        "upper": tuple(f"a person in a {c} {g}" for c in COLOURS for g in UPPER),
        "lower": tuple(f"a person in {c} {g}" for c in COLOURS for g in LOWER),
        "bag": (
            "a person without a bag",
            *(f"a person carrying a {c} {b}" for c in COLOURS for b in BAGS),
        ),
        "gender": ("a man", "a woman"),
        "hair": ("a person with short hair", "a person with long hair"),
    }


@dataclass(frozen=True)
class PseudoCaptions:
    """Soft per-slot targets for every crop, from its pseudo-identity's memory."""

    prompts: torch.Tensor  # (P, d) unit rows: the vocabulary's text embeddings
    slots: tuple[slice, ...]  # the prompts of each slot, as ranges of rows
    targets: torch.Tensor  # (n, P) per crop: a softmax within each slot
    scale: float  # the model's logit scale: how sharply a slot's phrases compete

    def loss(self, img: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Mean over slots of KL(target || the crops' own slot softmax)."""
        logits = self.scale * img @ self.prompts.to(img.device).t()
        target = self.targets[rows].to(img.device)
        terms = []
        for s in self.slots:
            p = target[:, s]
            log_q = F.log_softmax(logits[:, s], dim=1)
            terms.append((p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(1).mean())
        return torch.stack(terms).mean()

    def confidence(self) -> float:
        """Mean top probability per slot: how decided the pseudo-captions are."""
        return float(np.mean([self.targets[:, s].max(1).values.mean().item() for s in self.slots]))


def pseudo_captions(
    embeddings: np.ndarray,
    identities: Sequence[int],
    prompts: torch.Tensor,
    slot_sizes: Sequence[int],
    scale: float,
) -> PseudoCaptions:
    """Targets for crops with `embeddings` (unit rows) grouped into `identities`."""
    emb = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    ids = torch.as_tensor(np.asarray(identities))
    _, inverse = torch.unique(ids, return_inverse=True)
    memories = torch.zeros(int(inverse.max()) + 1 if len(ids) else 0, emb.shape[1])
    memories.index_add_(0, inverse, emb)
    memories = F.normalize(memories, dim=-1)
    bounds = np.cumsum([0, *slot_sizes])
    slots = tuple(slice(int(a), int(b)) for a, b in itertools.pairwise(bounds))
    if bounds[-1] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for slots of {list(slot_sizes)}")
    logits = scale * memories @ prompts.float().t()
    targets = torch.cat([F.softmax(logits[:, s], dim=1) for s in slots], dim=1)[inverse]
    return PseudoCaptions(prompts.float(), slots, targets, float(scale))
