"""Heap merge and rank fusion against hand-computed expectations."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from protos import retrieval_pb2
from server.broker.merge import (
    RRF_K,
    fuse_by_rank,
    is_merge_order,
    merge_mixed_versions,
    merge_topk,
)


@dataclass(frozen=True)
class H:
    node_id: str
    image_id: int
    score: float


def keys(hits):
    return [(h.node_id, h.image_id) for h in hits]


def test_merge_interleaves_by_score_higher_first():
    a = [H("a", 1, 0.9), H("a", 2, 0.5), H("a", 3, 0.1)]
    b = [H("b", 1, 0.8), H("b", 2, 0.7)]
    assert keys(merge_topk({"a": a, "b": b}, 4)) == [("a", 1), ("b", 1), ("b", 2), ("a", 2)]


def test_merge_ties_broken_by_node_then_image_id_whatever_the_input_order():
    a = [H("a", 7, 0.5), H("a", 3, 0.5)]
    b = [H("b", 1, 0.5)]
    c = [H("c", 2, 0.6)]
    expected = [("c", 2), ("a", 3), ("a", 7), ("b", 1)]
    assert keys(merge_topk([b, a, c], 10)) == expected
    assert keys(merge_topk([c, a[::-1], b], 10)) == expected


def test_same_image_id_on_two_nodes_is_two_hits_and_duplicates_within_a_node_collapse():
    a = [H("a", 5, 0.9), H("a", 5, 0.4)]
    b = [H("b", 5, 0.8)]
    merged = merge_topk([a, b], 5)
    assert keys(merged) == [("a", 5), ("b", 5)]
    assert merged[0].score == 0.9


def test_merge_returns_at_most_k_and_handles_empty_lists():
    assert merge_topk([[], []], 3) == []
    a = [H("a", i, 1.0 - i / 10) for i in range(10)]
    assert len(merge_topk([a, []], 3)) == 3
    with pytest.raises(ValueError, match="`k`"):
        merge_topk([a], 0)


def test_merge_of_per_node_topk_equals_global_topk_random():
    rng = random.Random(7)
    galleries = {f"n{j}": [H(f"n{j}", i, rng.random()) for i in range(50)] for j in range(5)}
    k = 12
    per_node_topk = {n: sorted(g, key=lambda h: -h.score)[:k] for n, g in galleries.items()}
    union = sorted((h for g in galleries.values() for h in g), key=lambda h: -h.score)[:k]
    merged = merge_topk(per_node_topk, k)
    assert keys(merged) == keys(union)
    assert is_merge_order(merged)


def test_merge_accepts_protobuf_hits():
    a = [retrieval_pb2.Hit(node_id="a", image_id=1, score=0.3)]
    b = [retrieval_pb2.Hit(node_id="b", image_id=9, score=0.7)]
    assert [h.image_id for h in merge_topk([a, b], 2)] == [9, 1]


def test_rrf_scores_are_sum_of_reciprocal_ranks():
    l1 = [H("a", 1, 0.9), H("a", 2, 0.8)]
    l2 = [H("a", 2, 50.0), H("b", 3, 40.0)]  # another scale entirely
    fused = fuse_by_rank([l1, l2], 10)
    by_key = {(f.hit.node_id, f.hit.image_id): f for f in fused}
    assert by_key[("a", 2)].fused_score == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 1))
    assert by_key[("a", 1)].fused_score == pytest.approx(1 / (RRF_K + 1))
    assert by_key[("b", 3)].fused_score == pytest.approx(1 / (RRF_K + 2))
    assert by_key[("a", 2)].ranks == (2, 1)
    assert keys([f.hit for f in fused]) == [("a", 2), ("a", 1), ("b", 3)]


def test_rrf_ignores_raw_scores_and_breaks_ties_deterministically():
    l1 = [H("b", 1, 0.01)]
    l2 = [H("a", 9, 99.0)]
    fused = fuse_by_rank([l1, l2], 2)
    assert keys([f.hit for f in fused]) == [("a", 9), ("b", 1)]  # equal fused score: node id
    assert fused[0].fused_score == fused[1].fused_score


def test_mixed_versions_merge_exactly_within_a_version_then_fuse_across():
    v1 = [[H("a", 1, 0.9), H("a", 2, 0.2)], [H("b", 1, 0.5)]]
    v2 = [[H("c", 1, 0.99), H("c", 2, 0.98)]]
    fused = merge_mixed_versions({"v1": v1, "v2": v2}, 10)
    ranks = {(f.hit.node_id, f.hit.image_id): f.ranks for f in fused}
    # within v1 the score merge puts b:1 (0.5) before a:2 (0.2)
    assert ranks[("a", 1)] == (1, None)
    assert ranks[("b", 1)] == (2, None)
    assert ranks[("a", 2)] == (3, None)
    assert ranks[("c", 1)] == (None, 1)
    assert keys([f.hit for f in fused])[:2] == [("a", 1), ("c", 1)]
    assert len(fused) == 5


def test_camera_routing_sends_each_node_its_own_cameras_and_skips_the_rest():
    from common.errors import InvalidQuery
    from server.broker.routing import route_cameras

    nodes = {"a": ["c1", "c2"], "b": ["c3"], "c": None, "d": []}
    route = route_cameras(nodes, ["c3", "c1"])
    assert route.send == {"a": ["c1"], "b": ["c3"], "c": ["c3", "c1"]}  # c: cameras unknown
    assert route.skipped == ["d"]
    assert route_cameras(nodes, []).send == {"a": [], "b": [], "c": [], "d": []}
    # camera on no node (every node's cameras known): the operator's mistake, said plainly
    with pytest.raises(InvalidQuery, match=r"unknown camera id\(s\) \['c9'\]"):
        route_cameras({"a": ["c1"], "b": ["c3"]}, ["c1", "c9"])
    # with a node of unknown cameras, c9 might be there: it goes to that node only
    route = route_cameras({"a": ["c1"], "c": None}, ["c9"])
    assert route.send == {"c": ["c9"]} and route.skipped == ["a"]
