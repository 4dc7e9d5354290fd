"""Merging per-node ranked lists into one answer: exact heap merge and rank fusion.

Pure functions, no gRPC and no I/O, so the ranking math can be tested by hand.

Conventions stated once, because faiss' own `ResultHeap` assumes the opposite two:
- Score direction: **higher is better** (cosine similarity of L2-normalised vectors).
- Identity: a hit is keyed by `(node_id, image_id)`; image ids are local to a node, so
  the same image id on two nodes is two different images.
- Ties: equal scores are broken by node id, then image id (both ascending), so the merged
  order never depends on which node answered first.

Scores made by different model versions are not comparable. `merge_topk` must only see
lists made by one version; `fuse_by_rank` combines lists whose scores are not comparable
(reciprocal rank fusion, Cormack et al. 2009, k = 60) and never looks at raw scores.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

RRF_K = 60  # the constant from the RRF paper; damps the weight of the very top ranks


class RankedHit(Protocol):
    """What merging needs from a hit (protos' `Hit` satisfies it)."""

    node_id: str
    image_id: int
    score: float


H = TypeVar("H", bound=RankedHit)


def hit_key(hit: RankedHit) -> tuple[str, int]:
    """The identity of a hit across the network."""
    return (hit.node_id, int(hit.image_id))


def _order(hit: RankedHit) -> tuple[float, str, int]:
    """Sort key: best score first, then deterministic tie-breaking."""
    return (-float(hit.score), hit.node_id, int(hit.image_id))


def _best_first(hits: Iterable[H]) -> list[H]:
    """One node's list in merge order, duplicates of a key collapsed to their best score.

    A node returns its hits sorted by score already; sorting again costs O(k log k) and
    makes the merge independent of how that node broke its own ties.
    """
    best: dict[tuple[str, int], H] = {}
    for hit in hits:
        key = hit_key(hit)
        if key not in best or _order(hit) < _order(best[key]):
            best[key] = hit
    return sorted(best.values(), key=_order)


def merge_topk(lists: Mapping[str, Sequence[H]] | Iterable[Sequence[H]], k: int) -> list[H]:
    """Exact k-way heap merge of score-sorted lists made by ONE model version.

    When every node returns its own top-k, the first k of the merge equal the top-k of a
    single index over the union of the galleries: any hit in the global top-k is in its
    node's top-k, because the node's list can only hold better hits above it.
    """
    if k <= 0:
        raise ValueError(f"`k` must be positive, got {k}")
    per_node = lists.values() if isinstance(lists, Mapping) else lists
    streams = [_best_first(hits) for hits in per_node]
    merged = heapq.merge(*streams, key=_order)
    out: list[H] = []
    seen: set[tuple[str, int]] = set()
    for hit in merged:
        key = hit_key(hit)
        if key in seen:  # the same node listed twice: keep its first (best) entry
            continue
        seen.add(key)
        out.append(hit)
        if len(out) == k:
            break
    return out


@dataclass(frozen=True)
class FusedHit:
    """A hit after rank fusion: `fused_score` replaces the incomparable raw score."""

    hit: RankedHit
    fused_score: float
    ranks: tuple[int | None, ...]  # 1-based rank of the hit in each fused list, None if absent


def fuse_by_rank(
    ranked_lists: Sequence[Sequence[H]], k: int, *, rrf_k: int = RRF_K
) -> list[FusedHit]:
    """Reciprocal rank fusion: score(d) = sum over lists of 1 / (rrf_k + rank of d).

    Use it when the lists' scores come from different model versions. Each input list is
    taken in the order given (best first); ranks start at 1. Ties in fused score are broken
    by node id, then image id. Returns at most `k` hits.
    """
    if k <= 0:
        raise ValueError(f"`k` must be positive, got {k}")
    if rrf_k < 0:
        raise ValueError(f"`rrf_k` must be >= 0, got {rrf_k}")
    fused: dict[tuple[str, int], float] = {}
    first_seen: dict[tuple[str, int], RankedHit] = {}
    ranks: dict[tuple[str, int], list[int | None]] = {}
    for list_index, hits in enumerate(ranked_lists):
        for rank, hit in enumerate(_dedupe_in_order(hits), start=1):
            key = hit_key(hit)
            fused[key] = fused.get(key, 0.0) + 1.0 / (rrf_k + rank)
            first_seen.setdefault(key, hit)
            ranks.setdefault(key, [None] * len(ranked_lists))[list_index] = rank
    order = sorted(fused, key=lambda key: (-fused[key], key[0], key[1]))
    return [FusedHit(first_seen[key], fused[key], tuple(ranks[key])) for key in order[:k]]


def _dedupe_in_order(hits: Iterable[H]) -> Iterable[H]:
    seen: set[tuple[str, int]] = set()
    for hit in hits:
        key = hit_key(hit)
        if key not in seen:
            seen.add(key)
            yield hit


def merge_mixed_versions(
    lists_by_version: Mapping[str, Sequence[Sequence[H]]],
    k: int,
    *,
    rrf_k: int = RRF_K,
) -> list[FusedHit]:
    """Merge lists from several model versions: exact within a version, RRF across.

    Hits made by the same version are comparable, so each version's node lists are first
    heap-merged into one ranked list (keeping exactness where it holds); those per-version
    lists are then fused by rank. Versions are taken in sorted order, which only matters
    for the `ranks` tuple, never for the result order.
    """
    per_version = [
        merge_topk(lists_by_version[version], k)
        for version in sorted(lists_by_version)
        if any(lists_by_version[version])
    ]
    return fuse_by_rank(per_version, k, rrf_k=rrf_k)


def is_merge_order(hits: Sequence[RankedHit]) -> bool:
    """True when `hits` is in merge order (best score first, ties by node then image id)."""
    return all(_order(a) <= _order(b) for a, b in itertools.pairwise(hits))
