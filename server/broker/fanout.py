"""One Search sent to many nodes at once, all under one absolute deadline.

Every call is started before any is waited on (gRPC futures), each with a timeout of the
time left until `send_until`; the broker then waits until `wait_until` and cancels the
stragglers, so a slow node costs the query at most its deadline, never more. What happened
to each call becomes one `NodeOutcome` (ok, timed_out or failed, with the gRPC status).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from protos import broker_pb2, node_pb2
from server.broker.registry import NodeClient, NodeRegistry

Clock = Callable[[], float]


@dataclass(frozen=True)
class NodeCall:
    """One in-flight node Search."""

    node: NodeClient
    future: grpc.Future | None  # None: not sent, no time was left
    started: float


def fan_out(
    sends: Sequence[tuple[NodeClient, list[str]]],
    request: node_pb2.SearchRequest,
    query_id: str,
    *,
    send_until: float,
    wait_until: float,
    clock: Clock,
) -> dict[str, NodeCall]:
    """Send `request` to each (node, its cameras), in order; wait; cancel what is late."""
    calls = {
        node.id: send(node, request, cameras, query_id, send_until, clock)
        for node, cameras in sends
    }
    wait(list(calls.values()), wait_until, clock)
    return calls


def send(
    node: NodeClient,
    request: node_pb2.SearchRequest,
    camera_ids: list[str],
    query_id: str,
    until: float,
    clock: Clock,
) -> NodeCall:
    now = clock()
    timeout = until - now
    if timeout <= 0:
        return NodeCall(node, None, now)
    if list(request.filters.camera_ids) != camera_ids:  # only this node's own cameras
        own = node_pb2.SearchRequest()
        own.CopyFrom(request)
        del own.filters.camera_ids[:]
        own.filters.camera_ids.extend(camera_ids)
        request = own
    future = node.stub.Search.future(request, timeout=timeout, metadata=node.metadata(query_id))
    return NodeCall(node, future, now)


def wait(calls: list[NodeCall], until: float, clock: Clock) -> None:
    """Block until every call finished or `until`; then cancel the stragglers."""
    pending = [c.future for c in calls if c.future is not None]
    done = threading.Semaphore(0)
    for future in pending:
        future.add_done_callback(lambda _f: done.release())
    for _ in pending:
        if not done.acquire(timeout=max(0.0, until - clock())):
            break
    for future in pending:
        if not future.done():
            future.cancel()


def collect(
    call: NodeCall, registry: NodeRegistry, clock: Clock
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
        outcome.message = "no answer before the query deadline; call cancelled"
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
