"""The broker's parts without servers: request validation, fan-out bookkeeping under one
deadline, coverage accounting, and `Broker.close` from two threads at once."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from common.errors import InvalidQuery, NotFound, Unavailable
from protos import broker_pb2, node_pb2
from server.broker.broker import Broker
from server.broker.config import BrokerConfig, NodeEntry
from server.broker.coverage import (
    coverage_of,
    describe_outcomes,
    require_an_answer,
    require_full,
    skipped_outcome,
)
from server.broker.fanout import NodeCall, collect, wait
from server.broker.registry import NodeRegistry, NodeState
from server.broker.validation import check_search, check_thumbnail, select_targets


def outcome(node_id: str, state: str, size: int = 10, **fields) -> broker_pb2.NodeOutcome:
    return broker_pb2.NodeOutcome(node_id=node_id, state=state, gallery_size=size, **fields)


def config(*ids: str, **overrides) -> BrokerConfig:
    nodes = tuple(NodeEntry(id=i, address=f"127.0.0.1:{1 + n}") for n, i in enumerate(ids))
    return BrokerConfig(nodes=nodes, operator_tokens=("t",), **overrides)


@pytest.fixture
def registry():
    reg = NodeRegistry(config("node-a", "node-b"))  # channels connect lazily: none here
    yield reg
    reg.close()


# ------------------------------------------------------------------ coverage
def test_coverage_counts_every_outcome_and_names_what_degraded_it():
    outcomes = [
        outcome("a", "ok"),
        outcome("b", "skipped", 5),
        outcome("c", "timed_out", 7),
        outcome("d", "failed", 3),
    ]
    cov = coverage_of(outcomes, {"a": node_pb2.SearchResponse(vectors_searched=4)})
    assert (cov.nodes_total, cov.nodes_answered, cov.nodes_skipped) == (4, 1, 1)
    assert (cov.nodes_timed_out, cov.nodes_failed) == (1, 1)
    assert (cov.vectors_searched, cov.vectors_total) == (4, 25)
    assert not cov.full
    assert list(cov.degraded) == ["timeout", "node_failure"]
    assert [o.node_id for o in cov.nodes] == ["a", "b", "c", "d"]


def test_skipped_nodes_count_towards_full_coverage():
    skipped = skipped_outcome("b", NodeState(gallery_size=5, model_version="v1"))
    assert (skipped.state, skipped.gallery_size, skipped.model_version) == ("skipped", 5, "v1")
    cov = coverage_of([outcome("a", "ok"), skipped], {"a": node_pb2.SearchResponse()})
    assert cov.full and not cov.degraded
    require_full(cov, list(cov.nodes), "q1")
    all_skipped = coverage_of([skipped], {})
    require_an_answer(all_skipped, [skipped], "q1")  # answered: with no hits, not an error


def test_no_answer_and_incomplete_coverage_say_which_node_did_what():
    outcomes = [
        outcome("a", "timed_out", grpc_status="DEADLINE_EXCEEDED"),
        outcome("b", "failed", grpc_status="UNAVAILABLE", message="connection refused"),
    ]
    cov = coverage_of(outcomes, {})
    with pytest.raises(Unavailable, match="no node answered query q7: a timed_out"):
        require_an_answer(cov, outcomes, "q7")
    with pytest.raises(Unavailable, match=r"0/2 nodes answered"):
        require_full(cov, outcomes, "q7")
    assert describe_outcomes([outcome("c", "ok"), *outcomes]) == (
        "c ok; a timed_out DEADLINE_EXCEEDED; b failed UNAVAILABLE (connection refused)"
    )


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text": "  "}, "`text` is empty"),
        ({"k": 0}, "`k` must be between 1 and 100"),
        ({"deadline_ms": -1}, "`deadline_ms` must be between 1 and 30000"),
        ({"deadline_ms": 20}, "leaves no time for nodes"),
    ],
)
def test_bad_searches_are_refused_naming_the_field(fields, message):
    request = broker_pb2.BrokerSearchRequest(**{"text": "a person", "k": 5, **fields})
    with pytest.raises(InvalidQuery, match=message):
        check_search(request, config("a"))


def test_a_valid_search_gets_its_budget_and_stripped_text():
    request = broker_pb2.BrokerSearchRequest(text="  red coat ", k=3)
    valid = check_search(request, config("a", default_deadline_ms=1500))
    assert (valid.text, valid.k, valid.budget_s) == ("red coat", 3, 1.5)


def test_unknown_nodes_are_refused_with_the_registered_ones(registry):
    assert [n.id for n in select_targets(registry, [])] == ["node-a", "node-b"]
    with pytest.raises(InvalidQuery, match=r"unknown node id\(s\) \['x'\]; registered"):
        select_targets(registry, ["x", "node-a"])
    with pytest.raises(NotFound, match="unknown node id 'x'"):
        check_thumbnail(broker_pb2.BrokerThumbnailRequest(node_id="x", image_id=1), registry.ids)
    with pytest.raises(InvalidQuery, match="`max_side` must be 0..1024"):
        check_thumbnail(
            broker_pb2.BrokerThumbnailRequest(node_id="node-a", image_id=1, max_side=5000),
            registry.ids,
        )


# ------------------------------------------------------------------ fan-out
class FakeFuture:
    """The part of grpc.Future that `wait` and `collect` use."""

    def __init__(self, answer=None, error: grpc.RpcError | None = None) -> None:
        self._answer, self._error = answer, error
        self._done, self._cancelled = False, False
        self._callbacks = []

    def finish(self) -> None:
        self._done = True
        for callback in self._callbacks:
            callback(self)

    def add_done_callback(self, callback) -> None:
        self._callbacks.append(callback)

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        self._cancelled = self._done = True
        return True

    def result(self, timeout=None):
        if self._error is not None:
            raise self._error
        return self._answer

    def exception(self, timeout=None):
        return self._error


class RefusedError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection refused"


def test_wait_cancels_stragglers_at_the_deadline_and_collect_reports_each_call(registry):
    a, b = registry.get("node-a"), registry.get("node-b")
    answer = node_pb2.SearchResponse(gallery_size=12, model_version="v2", took_ms=3.0)
    quick, hanging = FakeFuture(answer), FakeFuture()
    threading.Timer(0.01, quick.finish).start()
    calls = [NodeCall(a, quick, time.monotonic()), NodeCall(b, hanging, time.monotonic())]
    t0 = time.monotonic()
    wait(calls, t0 + 0.3, time.monotonic)
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert hanging.cancelled() and not quick.cancelled()

    ok, got = collect(calls[0], registry, time.monotonic)
    assert got is answer and (ok.state, ok.gallery_size, ok.took_ms) == ("ok", 12, 3.0)
    assert registry.snapshot("node-a").model_version == "v2"  # learnt from the answer
    late, none = collect(calls[1], registry, time.monotonic)
    assert none is None and (late.state, late.grpc_status) == ("timed_out", "DEADLINE_EXCEEDED")
    unsent, _ = collect(NodeCall(b, None, time.monotonic()), registry, time.monotonic)
    assert unsent.state == "timed_out" and unsent.message.startswith("not sent")
    refused = FakeFuture(error=RefusedError())
    refused.finish()
    failed, _ = collect(NodeCall(b, refused, time.monotonic()), registry, time.monotonic)
    assert (failed.state, failed.grpc_status, failed.message) == (
        "failed",
        "UNAVAILABLE",
        "connection refused",
    )


# ------------------------------------------------------------------ broker
def test_each_closer_runs_once_when_two_threads_close_the_broker(registry):
    broker = Broker(registry.config, registry)
    runs: list[int] = []
    for i in range(200):
        broker.add_closer(lambda i=i: runs.append(i))
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def close() -> None:
        start.wait()
        try:
            broker.close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=close) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert sorted(runs) == list(range(200))
