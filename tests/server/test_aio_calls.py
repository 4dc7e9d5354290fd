"""The broker's grpc.aio call loop: answers, cancellation that reaches the node, shutdown."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial

import grpc
import pytest
from broker_fixtures import ScriptedNode, broker_config

from protos import node_pb2
from server.broker.aio_calls import AioCalls, NotStarted, SearchCall
from server.broker.registry import open_channel

pytestmark = pytest.mark.timeout(60)


@dataclass
class WatchfulNode(ScriptedNode):
    """Hangs until released, and notes when the broker's cancellation reached it."""

    cancelled_at: list[float] = field(default_factory=list)
    handling: threading.Event = field(default_factory=threading.Event)

    def Search(self, request, context):
        self.handling.set()
        while not self.release.wait(0.01):
            if not context.is_active():
                self.cancelled_at.append(time.monotonic())
                return node_pb2.SearchResponse()
        return super().Search(request, context)


def _calls(running) -> AioCalls:
    cfg = broker_config({r.servicer.node_id: r.address for r in running})
    return AioCalls(cfg.nodes, partial(open_channel, config=cfg, api=grpc.aio))


def _search(node_id: str, timeout_s: float = 10.0) -> SearchCall:
    return SearchCall(node_id, node_pb2.SearchRequest(text="red", k=2), timeout_s, [])


def test_answers_come_back_in_order_and_a_cancel_reaches_the_node(scripted_nodes):
    quick, hanging = scripted_nodes(ScriptedNode("a", [(1, 0.9), (2, 0.8)]), WatchfulNode("b", []))
    calls = _calls([quick, hanging])
    try:
        fa, fb = calls.search([_search("a"), _search("b")])
        answer = fa.result(timeout=10)
        assert [h.image_id for h in answer.hits] == [1, 2]
        assert hanging.servicer.handling.wait(10) and not fb.done()
        assert fb.cancel() and fb.cancelled()
        deadline = time.monotonic() + 10
        while not hanging.servicer.cancelled_at and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hanging.servicer.cancelled_at, "the node never saw the cancellation"
    finally:
        calls.close()


def test_a_deadline_is_the_nodes_error_and_a_call_that_cannot_start_fails_alone(scripted_nodes):
    quick, hanging = scripted_nodes(ScriptedNode("a", [(1, 0.9)]), WatchfulNode("b", []))
    calls = _calls([quick, hanging])
    try:
        late, unknown, ok = calls.search([_search("b", 0.2), _search("nope"), _search("a")])
        with pytest.raises(grpc.RpcError) as err:
            late.result(timeout=10)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(NotStarted) as bug:
            unknown.result(timeout=10)
        assert bug.value.code() == grpc.StatusCode.UNKNOWN and "KeyError" in bug.value.details()
        assert ok.result(timeout=10).hits[0].image_id == 1
    finally:
        calls.close()


def test_close_ends_calls_in_flight_and_refuses_new_ones(scripted_nodes):
    (hanging,) = scripted_nodes(WatchfulNode("b", []))
    calls = _calls([hanging])
    (pending,) = calls.search([_search("b", 30.0)])
    assert hanging.servicer.handling.wait(10)
    started = time.monotonic()
    calls.close()
    assert pending.cancelled()  # closing the channel cancelled the call in flight
    assert time.monotonic() - started < 10
    with pytest.raises(RuntimeError, match="closed"):
        calls.search([_search("b")])
    calls.close()  # twice is fine
