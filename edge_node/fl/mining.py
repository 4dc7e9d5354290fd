"""Label-free structure in a node's own crops: tracklets, memories, pseudo-identities.

What a camera site has is crops with a camera id and a timestamp, no names. Seed paper 004
(unsupervised distributed re-identification on Jetson TX2) mines identities from exactly
that: link a camera's crops that are close in time and in appearance into tracklets (one
visit of one person), keep one memory per tracklet (the mean embedding of its crops), and
join memories of different cameras that are each other's nearest neighbour (mutual top-1)
into pseudo-identities; `common.self_train` trains on them (`edge_node.fl.task`). Pure
numpy on embeddings the caller made with the current global model, so the stages can be
measured against the generator's hidden ground truth (`label_quality`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.memories import SharedMemories


@dataclass(frozen=True)
class MiningSettings:
    """`max_gap_ms`: a crop continues a tracklet whose last crop is at most this much older
    (one detector track); `min_cos`: and at least this similar to that tracklet's mean.
    `link_cos`: two memories of different cameras join only as mutual top-1 above this.
    `triangles`: and, when > 0, only if they close at least this many triangles (a memory
    of a third camera that is mutual top-1 with both: 004's triangle relation, which needs
    three or more cameras, e.g. memories pooled across nodes).
    `link_window_ms`: when > 0, two memories are candidates for each other only if their
    visits are at most this far apart in time (a person walks from one camera of a site to
    the next within minutes: the space-time prior of spatio-temporal re-identification, and
    of 004's space-time sampling); 0 compares every pair.
    `shared_cos`: the threshold for a link between a local memory and one another node
    shared (`share-memories`); stricter than `link_cos` because most people seen here were
    never at the other site's camera, so a mutual top-1 there is usually a stranger (with
    the demo's base model 35% of the links at 0.3 are right, 73% at 0.7: docs/label-free.md)."""

    max_gap_ms: int = 2_000
    min_cos: float = 0.0
    link_cos: float = 0.7
    triangles: int = 0
    link_window_ms: int = 0
    shared_cos: float = 0.7


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def link_tracklets(
    cameras: Sequence[str], timestamps: Sequence[int], emb: np.ndarray, cfg: MiningSettings
) -> np.ndarray:
    """Tracklet label per crop (0..T-1). Per camera, crops in time order; each joins the most
    similar open tracklet (last crop within `max_gap_ms`, cosine to its mean >= `min_cos`)
    or starts one. Greedy and online, as a node sees crops arrive."""
    emb = _unit(emb)
    labels = np.full(len(cameras), -1, dtype=np.int64)
    order = sorted(range(len(cameras)), key=lambda i: (cameras[i], timestamps[i], i))
    sums: list[np.ndarray] = []
    newest: list[int] = []  # timestamp of each tracklet's newest crop
    open_by_camera: dict[str, list[int]] = {}
    for i in order:
        cam, ts = cameras[i], int(timestamps[i])
        live = [t for t in open_by_camera.get(cam, []) if ts - newest[t] <= cfg.max_gap_ms]
        open_by_camera[cam] = live
        best, best_cos = -1, cfg.min_cos
        for t in live:
            cos = float(sums[t] @ emb[i]) / max(float(np.linalg.norm(sums[t])), 1e-12)
            if cos >= best_cos:
                best, best_cos = t, cos
        if best < 0:
            best = len(sums)
            sums.append(np.zeros(emb.shape[1]))
            newest.append(ts)
            live.append(best)
        sums[best] = sums[best] + emb[i]
        newest[best] = ts
        labels[i] = best
    return labels


def memories(labels: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """One unit vector per tracklet: the mean of its crops' embeddings."""
    out = np.zeros((int(labels.max()) + 1 if len(labels) else 0, emb.shape[1]))
    np.add.at(out, labels, _unit(emb))
    return _unit(out)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def visit_spans(labels: np.ndarray, timestamps: Sequence[int], n: int) -> np.ndarray:
    """(n, 2) first and last timestamp (ms) of each tracklet's crops."""
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    stamps = np.asarray(timestamps, dtype=np.int64)
    np.minimum.at(first, labels, stamps)
    np.maximum.at(last, labels, stamps)
    return np.stack([first, last], axis=1)


def _time_gaps(spans: np.ndarray) -> np.ndarray:
    """(n, n) ms between two visits: 0 when they overlap."""
    first, last = spans[:, 0], spans[:, 1]
    return np.maximum(0, np.maximum(first[None, :] - last[:, None], first[:, None] - last[None, :]))


@dataclass(frozen=True)
class Mined:
    """Pseudo-identity per crop (`local`), and per shared memory (`shared`: the local
    pseudo-identity it joined, -1 when it joined none)."""

    local: np.ndarray
    shared: np.ndarray


def export_memories(
    labels: np.ndarray, cameras: Sequence[str], timestamps: Sequence[int], emb: np.ndarray
) -> SharedMemories:
    """This node's memories as it would share them: camera key = the camera's slot in the
    node's sorted camera list (the server adds the source)."""
    mem = memories(labels, emb)
    slot = {c: i for i, c in enumerate(sorted(set(cameras)))}
    cams = np.zeros(len(mem), dtype=np.int64)
    cams[labels] = [slot[c] for c in cameras]
    return SharedMemories(mem.astype(np.float32), cams, visit_spans(labels, timestamps, len(mem)))


def pseudo_identities(
    labels: np.ndarray,
    cameras: Sequence[str],
    emb: np.ndarray,
    cfg: MiningSettings,
    timestamps: Sequence[int] | None = None,
) -> np.ndarray:
    """Pseudo-identity per crop (`mine_identities` without shared memories)."""
    return mine_identities(labels, cameras, emb, cfg, timestamps).local


def mine_identities(
    labels: np.ndarray,
    cameras: Sequence[str],
    emb: np.ndarray,
    cfg: MiningSettings,
    timestamps: Sequence[int] | None = None,
    shared: SharedMemories | None = None,
) -> Mined:
    """Tracklets of different cameras that are mutual top-1 (for each pair of cameras, each
    is the other's most similar memory, cosine >= `link_cos`, closing >= `triangles`
    triangles, visits within `link_window_ms` of each other by `timestamps` when that is
    set) are joined, transitively (union-find). `shared` memories of other nodes take part
    as cameras of their own (at `shared_cos`), linked to local memories only; each joins
    the one local pseudo-identity it links to, and none when it links to two."""
    mem = memories(labels, emb)
    n_local = len(mem)
    camera_of: dict[int, object] = {}
    for t, cam in zip(labels.tolist(), cameras, strict=True):
        camera_of.setdefault(t, cam)
    spans = None
    if cfg.link_window_ms > 0:
        if timestamps is None:
            raise ValueError("link_window_ms is set: pass the crops' timestamps")
        spans = visit_spans(labels, timestamps, n_local)
    if shared is not None and len(shared):
        if shared.vectors.shape[1] != mem.shape[1]:
            raise ValueError(
                f"shared memories have {shared.vectors.shape[1]} dims, this model {mem.shape[1]}"
            )
        mem = np.concatenate([mem, _unit(shared.vectors)])
        for i, key in enumerate(shared.cameras.tolist()):
            camera_of[n_local + i] = ("shared", int(key))
        if spans is not None:
            spans = np.concatenate([spans, np.asarray(shared.spans, dtype=np.int64)])
    gaps = _time_gaps(spans) if spans is not None else None
    cams = sorted(set(camera_of.values()), key=repr)
    members = {c: np.array([t for t in range(len(mem)) if camera_of.get(t) == c]) for c in cams}
    links: list[tuple[int, int]] = []
    for a_i, a in enumerate(cams):
        for b in cams[a_i + 1 :]:
            ta, tb = members[a], members[b]
            if not len(ta) or not len(tb) or (isinstance(a, tuple) and isinstance(b, tuple)):
                continue  # two other sites' cameras: theirs to link, not this node's
            sim = mem[ta] @ mem[tb].T
            if gaps is not None:  # out of the window: never a candidate
                sim = np.where(gaps[np.ix_(ta, tb)] <= cfg.link_window_ms, sim, -np.inf)
            best_b, best_a = sim.argmax(axis=1), sim.argmax(axis=0)
            floor = cfg.shared_cos if isinstance(a, tuple) or isinstance(b, tuple) else cfg.link_cos
            links += [
                (int(ta[i]), int(tb[j]))
                for i, j in enumerate(best_b)
                if best_a[j] == i and sim[i, j] >= floor
            ]
    if cfg.triangles > 0:
        neighbours: dict[int, set[int]] = {}
        for x, y in links:
            neighbours.setdefault(x, set()).add(y)
            neighbours.setdefault(y, set()).add(x)
        links = [(x, y) for x, y in links if len(neighbours[x] & neighbours[y]) >= cfg.triangles]
    local_links = [(x, y) for x, y in links if y < n_local and x < n_local]
    parent = list(range(n_local))
    for x, y in local_links:
        parent[_find(parent, x)] = _find(parent, y)
    roots = np.array([_find(parent, t) for t in range(n_local)], dtype=np.int64)
    _, dense = np.unique(roots, return_inverse=True)
    # a shared memory joins the local pseudo-identity it links to when it links to one only:
    # another site's visit never merges two of this site's pseudo-identities (letting it do
    # so chained whole sites together: pairwise precision 0.82 -> 0.27 on the demo)
    reach: dict[int, list[int]] = {}
    for x, y in links:
        if (x < n_local) != (y < n_local):
            local, other = (x, y) if x < n_local else (y, x)
            reach.setdefault(other - n_local, []).append(int(dense[local]))
    joined = np.full(len(mem) - n_local, -1, dtype=np.int64)
    for j, ids in reach.items():
        if len(set(ids)) == 1:
            joined[j] = ids[0]
    return Mined(dense[labels], joined)


def _pairs(counts: np.ndarray) -> float:
    return float((counts * (counts - 1) / 2).sum())


def label_quality(pred: Sequence[int], truth: Sequence[int]) -> dict[str, float]:
    """Pairwise precision and recall of a labelling against the truth (pairs of crops put
    together), label counts, and purity (share of crops whose label's majority truth is
    theirs). Precision 1 with recall 0 is "every crop alone"; the reverse is "one cluster"."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    joint = np.zeros((p.max() + 1, t.max() + 1)) if len(p) else np.zeros((0, 0))
    np.add.at(joint, (p, t), 1)
    together = _pairs(joint)
    in_pred, in_truth = _pairs(joint.sum(1)), _pairs(joint.sum(0))
    return {
        "precision": round(together / in_pred, 4) if in_pred else 1.0,
        "recall": round(together / in_truth, 4) if in_truth else 1.0,
        "labels": int(joint.shape[0]),
        "true_labels": int(joint.shape[1]),
        "purity": round(float(joint.max(axis=1).sum() / max(len(p), 1)), 4),
    }
