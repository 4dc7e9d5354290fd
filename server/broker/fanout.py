"""One Search sent to many nodes at once, all under one absolute deadline.

Every call is started before any is waited on, in one hop onto the broker's `grpc.aio`
loop (`aio_calls.py`), each with a timeout of the time left until `send_until`; the broker
then waits until `wait_until` and cancels the stragglers, so a slow node costs the query at
most its deadline, never more. What happened to each call becomes one `NodeOutcome` (ok,
timed_out or failed, with the gRPC status).

With many nodes the deadline alone lets the slowest node set every query's latency (Dean
and Barroso, "The Tail at Scale"). `AdaptiveWait` is Vespa's answer
(`coverage/minimum` with `min/max-wait-after-coverage-factor`): once a minimum share of
the nodes has answered, wait only a bounded extra time for the rest, then answer with
coverage naming who was left out (degraded reason `adaptive_timeout`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from protos import broker_pb2, node_pb2
from server.broker.aio_calls import AioCalls, SearchCall
from server.broker.registry import NodeClient, NodeRegistry

Clock = Callable[[], float]


@dataclass(frozen=True)
class NodeCall:
    """One in-flight node Search."""

    node: NodeClient
    future: Future | None  # None: not sent, no time was left
    started: float


@dataclass(frozen=True)
class AdaptiveWait:
    """When to stop waiting for stragglers once enough nodes have answered.

    After `min_share` of the nodes asked have answered, at elapsed time t since the query
    started, the broker waits at most `min(max_extra_s, factor * t)` more: a straggler may
    cost a fraction of what the fast nodes took, never the whole deadline. `min_share` 0
    turns it off (wait for every node until the deadline)."""

    min_share: float = 0.0
    factor: float = 0.5
    max_extra_s: float = 0.05

    @property
    def enabled(self) -> bool:
        return self.min_share > 0.0

    def cut_off(self, answered: int, total: int, started: float, now: float, until: float) -> float:
        """The time to stop waiting, given `answered` of `total` nodes have answered."""
        if not self.enabled or total == 0 or answered < math.ceil(self.min_share * total):
            return until
        return min(until, now + min(self.max_extra_s, self.factor * max(0.0, now - started)))


@dataclass(frozen=True)
class FanOut:
    calls: dict[str, NodeCall]
    cut_at: float | None  # when the adaptive wait stopped waiting, None if it did not


def fan_out(
    sends: Sequence[tuple[NodeClient, list[str], int]],
    request: node_pb2.SearchRequest,
    query_id: str,
    *,
    calls: AioCalls,
    send_until: float,
    wait_until: float,
    clock: Clock,
    adaptive: AdaptiveWait | None = None,
    started: float | None = None,
) -> FanOut:
    """Send `request` to each (node, its cameras, hits to ask it for), all in one hop onto
    the call loop; wait; cancel what is late."""
    now = clock()
    timeout = send_until - now
    if timeout <= 0:  # nothing left to send with
        sent = {node.id: NodeCall(node, None, now) for node, _, _ in sends}
    else:
        prepared = [
            SearchCall(node.id, node_request(request, cameras, k), timeout, node.metadata(query_id))
            for node, cameras, k in sends
        ]
        futures = calls.search(prepared)
        sent = {
            node.id: NodeCall(node, future, now)
            for (node, _, _), future in zip(sends, futures, strict=True)
        }
    cut_at = wait(list(sent.values()), wait_until, clock, adaptive=adaptive, started=started)
    return FanOut(sent, cut_at)


def node_request(
    request: node_pb2.SearchRequest, camera_ids: list[str], k: int | None = None
) -> node_pb2.SearchRequest:
    """`request` for one node: only its own cameras, and fewer hits at scale (a copy only
    when either differs)."""
    own_cameras = list(request.filters.camera_ids) != camera_ids
    own_k = k is not None and k != request.k
    if not (own_cameras or own_k):
        return request
    own = node_pb2.SearchRequest()
    own.CopyFrom(request)
    if own_cameras:
        del own.filters.camera_ids[:]
        own.filters.camera_ids.extend(camera_ids)
    if own_k:
        own.k = k
    return own


def wait(
    calls: list[NodeCall],
    until: float,
    clock: Clock,
    *,
    adaptive: AdaptiveWait | None = None,
    started: float | None = None,
) -> float | None:
    """Block until every call finished or `until` (brought forward by `adaptive` once
    enough nodes answered); then cancel the stragglers. Returns the adaptive cut-off
    time when it ended the wait early with calls still pending, else None."""
    pending = [c.future for c in calls if c.future is not None]
    total = len(calls)  # nodes not sent to count against the share too
    done = threading.Semaphore(0)
    answered = [0]
    answered_lock = threading.Lock()

    def on_done(future) -> None:
        if not future.cancelled() and future.exception() is None:
            with answered_lock:
                answered[0] += 1
        done.release()

    for future in pending:
        future.add_done_callback(on_done)
    policy = adaptive or AdaptiveWait()
    begun = clock() if started is None else started
    stop_at = until
    finished = 0
    while finished < len(pending):
        with answered_lock:
            count = answered[0]
        stop_at = policy.cut_off(count, total, begun, clock(), stop_at)
        if not done.acquire(timeout=max(0.0, stop_at - clock())):
            break
        finished += 1
    cut = policy.enabled and stop_at < until and finished < len(pending)
    for future in pending:
        if not future.done():
            future.cancel()
    return stop_at if cut else None


def collect(
    call: NodeCall, registry: NodeRegistry, clock: Clock, *, adaptive_cut: bool = False
) -> tuple[broker_pb2.NodeOutcome, node_pb2.SearchResponse | None]:
    """The outcome of a finished (or cancelled) call, and the node's answer if it gave one.

    An answer also tells the registry the node's gallery size and model version."""
    node = call.node
    known = registry.snapshot(node.id)
    outcome = broker_pb2.NodeOutcome(
        node_id=node.id, gallery_size=known.gallery_size, model_version=known.model_version
    )
    if call.future is None:
        outcome.state, outcome.grpc_status = "timed_out", "DEADLINE_EXCEEDED"
        outcome.message = "not sent: the deadline was spent before this node's turn"
        return outcome, None
    future = call.future
    try:
        answer = future.result(timeout=0) if future.done() and not future.cancelled() else None
    except grpc.RpcError as err:
        code = err.code()
        outcome.took_ms = (clock() - call.started) * 1000.0
        outcome.grpc_status = code.name
        outcome.message = err.details() or ""
        late = code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        outcome.state = "timed_out" if late else "failed"
        return outcome, None
    if answer is None:  # cancelled by us in `wait`
        outcome.state, outcome.grpc_status = "timed_out", "DEADLINE_EXCEEDED"
        outcome.message = (
            "left out by the adaptive wait: enough nodes had answered; call cancelled"
            if adaptive_cut
            else "no answer before the query deadline; call cancelled"
        )
        outcome.took_ms = (clock() - call.started) * 1000.0
        return outcome, None
    outcome.state = "ok"
    outcome.took_ms = answer.took_ms or (clock() - call.started) * 1000.0
    outcome.gallery_size = answer.gallery_size
    outcome.model_version = answer.model_version
    outcome.used_vector = answer.used_vector
    outcome.hits = len(answer.hits)
    registry.learn(node.id, gallery_size=answer.gallery_size, model_version=answer.model_version)
    return outcome, answer
