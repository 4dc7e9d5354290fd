"""Text-to-image retrieval metrics exactly as the field computes them (IRRA, CVPR 2023).

similarity = text @ image.T; a gallery image is relevant when it shows the query's person
id. CMC Rank-k is clamped at 1 per query; AP is non-interpolated over the full ranking;
INP = num_rel / (position of the last positive + 1). Ties are broken by gallery order
(stable sort), so results are reproducible. Queries with no positive in the gallery are
excluded and counted, never averaged in as NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")  # what every report shows, in this order


def rank_gallery(sim: np.ndarray) -> np.ndarray:
    """Gallery indices per query, best first; ties keep gallery order."""
    return np.argsort(-np.asarray(sim, dtype=np.float64), axis=1, kind="stable")


def retrieval_metrics(
    sim: np.ndarray,
    query_ids: Sequence[int],
    gallery_ids: Sequence[int],
    *,
    ranks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict:
    """R1/R5/R10, mAP and mINP in percent, plus `queries`, `gallery` and `excluded`."""
    sim = np.asarray(sim)
    q_ids = np.asarray(query_ids)
    g_ids = np.asarray(gallery_ids)
    if sim.shape != (len(q_ids), len(g_ids)):
        raise ValueError(f"similarity is {sim.shape}, expected ({len(q_ids)}, {len(g_ids)})")
    cmc_hits = np.zeros(len(ranks))
    ap_sum = inp_sum = 0.0
    valid = 0
    for start in range(0, len(q_ids), chunk):
        order = rank_gallery(sim[start : start + chunk])
        matches = g_ids[order] == q_ids[start : start + chunk, None]
        num_rel = matches.sum(1)
        keep = num_rel > 0
        matches, num_rel = matches[keep], num_rel[keep]
        valid += int(keep.sum())
        if not len(matches):
            continue
        first = matches.argmax(1)
        for i, k in enumerate(ranks):
            cmc_hits[i] += int((first < k).sum())
        hits_so_far = matches.cumsum(1)
        positions = np.arange(1, matches.shape[1] + 1)
        ap_sum += float(((hits_so_far / positions) * matches).sum(1).__truediv__(num_rel).sum())
        last = matches.shape[1] - 1 - matches[:, ::-1].argmax(1)
        inp_sum += float((num_rel / (last + 1)).sum())
    out = {
        f"R{k}": (float(100.0 * cmc_hits[i] / valid) if valid else 0.0) for i, k in enumerate(ranks)
    }
    out["mAP"] = 100.0 * ap_sum / valid if valid else 0.0
    out["mINP"] = 100.0 * inp_sum / valid if valid else 0.0
    out.update(queries=valid, gallery=len(g_ids), excluded=len(q_ids) - valid)
    return out
