"""share-memories (issue 14): the wire format, cross-site links, and the loss's fixed keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import AdapterMismatch
from common.memories import CAMERA_STRIDE, SharedMemories, from_record, pool, to_record
from common.self_train import supcon_loss
from edge_node.fl.mining import MiningSettings, export_memories, mine_identities


def _memories(m: int = 3, d: int = 4) -> SharedMemories:
    v = np.random.default_rng(0).normal(size=(m, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    spans = np.stack([np.arange(m) * 1000, np.arange(m) * 1000 + 500], axis=1)
    return SharedMemories(v, np.arange(m) % 2, spans)


def test_memories_round_trip_as_float16_and_bad_ones_are_refused_by_name():
    mem = _memories()
    back = from_record(to_record(mem), dim=4, camera_slots=True)
    assert np.allclose(back.vectors, mem.vectors, atol=2e-3)
    assert np.array_equal(back.cameras, mem.cameras) and np.array_equal(back.spans, mem.spans)
    assert mem.nbytes == 3 * 4 * 2 + 3 * 8 + 3 * 2 * 8  # what the record carries
    bad = {
        "dims": (mem, {"dim": 8}),
        "unit length": (SharedMemories(2 * mem.vectors, mem.cameras, mem.spans), {}),
        "NaN": (SharedMemories(mem.vectors * np.nan, mem.cameras, mem.spans), {}),
        "ends before": (SharedMemories(mem.vectors, mem.cameras, mem.spans[:, ::-1]), {}),
        "out of range": (
            SharedMemories(mem.vectors, mem.cameras + CAMERA_STRIDE, mem.spans),
            {"camera_slots": True},
        ),
    }
    for words, (value, checks) in bad.items():
        with pytest.raises(AdapterMismatch, match=words):
            from_record(to_record(value), where="memories of node 7", **checks)
    record = to_record(mem)
    del record["spans"]
    with pytest.raises(AdapterMismatch, match="expected arrays"):
        from_record(record)


def test_pooling_keeps_each_sources_cameras_apart():
    a, b = _memories(2), _memories(3)
    pooled = pool([(0, a), (1, b), (2, _memories(0))])
    assert len(pooled) == 5 and pool([(0, _memories(0))]) is None
    assert pooled.cameras.tolist() == [0, 1, CAMERA_STRIDE, CAMERA_STRIDE + 1, CAMERA_STRIDE]


def _site():
    """Two people at this site, each seen on cameras A and B a minute apart, 1,000 s between
    the two people; another site saw person 0 (on its camera 0) 30 s after he left B."""
    e = np.eye(3)
    cams = ["A", "B", "A", "B"]
    stamps = [0, 60_000, 1_000_000, 1_060_000]
    emb = np.array([e[0], 0.8 * e[0] + 0.6 * e[2], e[1], 0.8 * e[1] + 0.6 * e[2]])
    tracklets = np.arange(4)
    return cams, stamps, emb, tracklets


def test_a_shared_memory_joins_the_local_identity_it_matches_within_the_window():
    cams, stamps, emb, tracklets = _site()
    other = SharedMemories(np.array([[1.0, 0.0, 0.0]]), np.array([0]), np.array([[90_000, 95_000]]))
    cfg = MiningSettings(link_cos=0.5, link_window_ms=120_000, shared_cos=0.7)
    mined = mine_identities(tracklets, cams, emb, cfg, stamps, other)
    assert mined.local[0] == mined.local[1] != mined.local[2] == mined.local[3]
    assert mined.shared.tolist() == [mined.local[0]]
    # the same memory outside the window, or below shared-cos, joins nothing
    late = SharedMemories(other.vectors, other.cameras, np.array([[500_000, 505_000]]))
    assert mine_identities(tracklets, cams, emb, cfg, stamps, late).shared.tolist() == [-1]
    strict = MiningSettings(link_cos=0.5, link_window_ms=120_000, shared_cos=1.01)
    assert mine_identities(tracklets, cams, emb, strict, stamps, other).shared.tolist() == [-1]
    with pytest.raises(ValueError, match="dims"):
        wide = SharedMemories(np.ones((1, 5)) / math.sqrt(5), other.cameras, other.spans)
        mine_identities(tracklets, cams, emb, cfg, stamps, wide)


def test_another_sites_memory_never_merges_two_local_identities():
    """A memory mutual top-1 with person 0 on A and person 1 on B (the local link between
    those is out of the window) would chain them; it joins neither."""
    e = np.eye(3)
    cams, stamps = ["A", "B"], [0, 1_000_000]
    emb = np.array([e[0], e[1]])
    tracklets = np.arange(2)
    bridge = np.array([[1.0, 1.0, 0.0]]) / math.sqrt(2)
    other = SharedMemories(bridge, np.array([0]), np.array([[500_000, 500_000]]))
    cfg = MiningSettings(link_cos=-1.0, link_window_ms=600_000, shared_cos=0.5)
    mined = mine_identities(tracklets, cams, emb, cfg, stamps, other)
    assert mined.local[0] != mined.local[1] and mined.shared.tolist() == [-1]


def test_exported_memories_carry_slots_and_spans_not_camera_names():
    cams, stamps, emb, _ = _site()
    tracklets = np.array([0, 1, 2, 1])  # crop 3 continues tracklet 1 (B)
    mem = export_memories(tracklets, cams, stamps, emb)
    assert mem.cameras.tolist() == [0, 1, 0] and mem.spans.tolist()[1] == [60_000, 1_060_000]
    assert np.allclose(np.linalg.norm(mem.vectors, axis=1), 1.0)


def test_keys_are_positives_beside_the_batch():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids, t = torch.tensor([0, 1]), 0.5
    assert supcon_loss(img, ids, t).item() == 0.0  # no crop has a positive in the batch
    keys, key_ids = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # crop 0: its key (cos 1) against crop 1 (cos 0); crop 1 still has no positive
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0)))
    assert abs(supcon_loss(img, ids, t, keys, key_ids).item() - expected) < 1e-6
