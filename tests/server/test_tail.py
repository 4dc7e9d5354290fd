"""Tail control at scale: adaptive coverage wait and fewer hits per node, on real gRPC."""

from __future__ import annotations

import pytest
from broker_fixtures import ScriptedNode, broker_config

from common.errors import ConfigError
from protos import broker_pb2
from server.broker.config import TailSettings
from server.broker.fanout import AdaptiveWait
from server.broker.topk import hits_per_node

pytestmark = pytest.mark.timeout(60)


def test_cut_off_waits_a_bounded_share_of_the_time_taken():
    policy = AdaptiveWait(min_share=0.9, factor=0.5, max_extra_s=0.05)
    # 8 of 10 answered: not enough, keep the deadline
    assert policy.cut_off(8, 10, started=0.0, now=0.02, until=2.0) == 2.0
    # 9 of 10 after 20 ms: wait 10 ms more (factor 0.5), not the whole deadline
    assert policy.cut_off(9, 10, started=0.0, now=0.02, until=2.0) == pytest.approx(0.03)
    # late in the query the cap applies
    assert policy.cut_off(9, 10, started=0.0, now=1.0, until=2.0) == pytest.approx(1.05)
    # never beyond the deadline
    assert policy.cut_off(10, 10, started=0.0, now=1.99, until=2.0) == 2.0
    assert AdaptiveWait().cut_off(10, 10, started=0.0, now=0.5, until=2.0) == 2.0  # off


def test_tail_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="adaptive-min-coverage"):
        TailSettings(adaptive_min_coverage=1.5)
    with pytest.raises(ConfigError, match="topk-probability"):
        TailSettings(topk_probability=1.0)


def _fleet(scripted_nodes, n: int, slow: dict[int, float]) -> dict[str, str]:
    servicers = [
        ScriptedNode(f"n{i:02d}", [(i * 100 + j, 1.0 - 0.01 * j - 0.001 * i) for j in range(10)],
                     delay_s=slow.get(i, 0.0))
        for i in range(n)
    ]  # fmt: skip
    return {s.servicer.node_id: s.address for s in scripted_nodes(*servicers)}


def test_adaptive_wait_answers_without_the_straggler_and_names_it(scripted_nodes, start_broker):
    addresses = _fleet(scripted_nodes, 10, slow={3: 30.0})  # n03 hangs until teardown
    tail = TailSettings(adaptive_min_coverage=0.9, adaptive_wait_factor=0.5)
    handle = start_broker(
        broker_config(addresses, default_deadline_ms=20_000, max_deadline_ms=30_000, tail=tail)
    )
    req = broker_pb2.BrokerSearchRequest(text="a man in a grey jacket", k=5)
    response = handle.stub.Search(req, metadata=handle.auth(), timeout=30)
    cov = response.coverage
    assert (cov.nodes_answered, cov.nodes_timed_out) == (9, 1)
    assert "adaptive_timeout" in cov.degraded
    left_out = [o for o in cov.nodes if o.state != "ok"]
    assert [o.node_id for o in left_out] == ["n03"] and "adaptive" in left_out[0].message
    # it answered long before the 20 s deadline it would otherwise have waited out
    assert response.took_ms < 10_000
    assert len(response.hits) == 5


def test_without_adaptive_wait_the_broker_waits_for_a_slow_node(scripted_nodes, start_broker):
    addresses = _fleet(scripted_nodes, 4, slow={1: 0.3})
    handle = start_broker(
        broker_config(addresses, default_deadline_ms=20_000, max_deadline_ms=30_000)
    )
    req = broker_pb2.BrokerSearchRequest(text="a man in a grey jacket", k=5)
    response = handle.stub.Search(req, metadata=handle.auth(), timeout=30)
    assert response.coverage.nodes_answered == 4
    assert "adaptive_timeout" not in response.coverage.degraded


def _scored_fleet(scripted_nodes, per_node_scores: list[list[float]]) -> dict[str, str]:
    servicers = [
        ScriptedNode(f"n{i:02d}", [(i * 100 + j, score) for j, score in enumerate(scores)])
        for i, scores in enumerate(per_node_scores)
    ]
    return {s.servicer.node_id: s.address for s in scripted_nodes(*servicers)}


def _exact_top(per_node_scores: list[list[float]], k: int) -> list[tuple[str, int]]:
    every = [
        (score, f"n{i:02d}", i * 100 + j)
        for i, scores in enumerate(per_node_scores)
        for j, score in enumerate(scores)
    ]
    return [(node, image) for _, node, image in sorted(every, reverse=True)[:k]]


def _scores(n: int, best_on_n00: int) -> list[list[float]]:
    """Distinct float32-safe scores: n00 holds `best_on_n00` of the global top-10."""
    scores = [[0.5 - 0.01 * j - 0.0001 * i for j in range(10)] for i in range(n)]
    scores[0][:best_on_n00] = [0.99 - 0.01 * j for j in range(best_on_n00)]
    return scores


def test_nodes_are_asked_for_k_prime_and_the_merge_is_exact_within_it(scripted_nodes, start_broker):
    n, k = 20, 10
    k_prime = hits_per_node(k, [0] * n, 0.99)[0]  # gallery sizes unknown: equal shares
    assert 1 < k_prime < k
    scores = _scores(n, best_on_n00=k_prime)  # the concentration the budget allows
    handle = start_broker(
        broker_config(
            _scored_fleet(scripted_nodes, scores), tail=TailSettings(topk_probability=0.99)
        )
    )
    req = broker_pb2.BrokerSearchRequest(text="a man in a grey jacket", k=k)
    response = handle.stub.Search(req, metadata=handle.auth(), timeout=30)
    assert [(h.node_id, h.image_id) for h in response.hits] == _exact_top(scores, k)


def test_k_prime_is_approximate_when_one_node_holds_more_of_the_top_k(scripted_nodes, start_broker):
    """The honest failure mode (server/broker/topk.py): one site holds most of the answer."""
    n, k = 20, 10
    k_prime = hits_per_node(k, [0] * n, 0.99)[0]
    scores = _scores(n, best_on_n00=k_prime + 2)
    nodes = _scored_fleet(scripted_nodes, scores)
    tail = TailSettings(topk_probability=0.99)
    handle = start_broker(broker_config(nodes, tail=tail))
    req = broker_pb2.BrokerSearchRequest(text="a man in a grey jacket", k=k)
    got = [(h.node_id, h.image_id) for h in handle.stub.Search(req, metadata=handle.auth()).hits]
    exact = _exact_top(scores, k)
    assert got != exact and sum(node == "n00" for node, _ in got) == k_prime
    exact_broker = start_broker(broker_config(nodes))  # topk-probability off: exact
    again = exact_broker.stub.Search(req, metadata=exact_broker.auth()).hits
    assert [(h.node_id, h.image_id) for h in again] == exact
