"""Offline retrieval evaluation: every caption queries the gallery of all record images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.datasets import Record
from common.metrics import rank_gallery, retrieval_metrics
from common.model import eval_mode
from common.prefix_cache import image_features_fn
from common.train import ImageBank, TextFeatureCache, core_model, text_tower_frozen


@dataclass
class Embeddings:
    gallery: np.ndarray  # (g, d) float32, normalised
    gallery_ids: np.ndarray
    gallery_paths: list
    queries: np.ndarray  # (q, d)
    query_ids: np.ndarray
    query_texts: list[str]


@torch.no_grad()
def embed_records(
    model: nn.Module,
    records: Sequence[Record],
    *,
    batch_size: int = 128,
    text_cache: TextFeatureCache | None = None,
    bank: ImageBank | None = None,
) -> Embeddings:
    core = core_model(model)
    bank = bank or ImageBank(records, core.preprocess)
    by_path = {r.image_path: r for r in records}
    paths = sorted(by_path)
    idx = torch.tensor([bank.index[p] for p in paths])
    device = core.logit_scale.device
    gal = []
    with eval_mode(model):
        image_features = image_features_fn(core, bank, device)  # a frozen prefix: cached
        for i in range(0, len(idx), batch_size):
            feats = image_features(idx[i : i + batch_size], None)
            gal.append(F.normalize(feats.float(), dim=-1).cpu())
        texts = [c for r in records for c in r.captions]
        q_ids = [r.person_id for r in records for _ in r.captions]
        if text_tower_frozen(core):
            cache = TextFeatureCache.for_model(core, text_cache)
            feats = core.text_proj(cache.get(core, texts).to(device))
            queries = F.normalize(feats.float(), dim=-1).cpu()
        else:
            queries = core.encode_text(texts, batch_size=batch_size)
    empty = torch.empty(0, core.embed_dim)
    return Embeddings(
        torch.cat([empty, *gal]).numpy(),
        np.array([by_path[p].person_id for p in paths]),
        paths,
        queries.numpy(),
        np.array(q_ids),
        texts,
    )


def evaluate(
    model: nn.Module,
    records: Sequence[Record],
    *,
    batch_size: int = 128,
    text_cache: TextFeatureCache | None = None,
    bank: ImageBank | None = None,
) -> dict:
    """R1/R5/R10/mAP/mINP (percent), queries, gallery for text->image retrieval."""
    emb = embed_records(model, records, batch_size=batch_size, text_cache=text_cache, bank=bank)
    return retrieval_metrics(emb.queries @ emb.gallery.T, emb.query_ids, emb.gallery_ids)


def top_k(emb: Embeddings, k: int = 10) -> list[list[tuple[str, float]]]:
    """Per query, the k best gallery files with their similarity (the results file)."""
    sim = emb.queries @ emb.gallery.T
    order = rank_gallery(sim)[:, :k]
    return [
        [(str(emb.gallery_paths[j]), float(sim[q, j])) for j in row] for q, row in enumerate(order)
    ]
