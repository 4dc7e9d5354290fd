"""The broker's node Searches, driven from one asyncio event loop (`grpc.aio`).

Why: with gRPC's synchronous stubs every in-flight call is a Python future of its own and
every channel with calls in flight runs a polling thread, so at hundreds of nodes the
broker's own CPU per node sets a query's latency (docs/broker.md, "Fleet scale"). `grpc.aio`
drives all calls from one completion queue on one thread. The rest of the broker stays
synchronous: `AioCalls.search` hands back `concurrent.futures.Future` objects, which
`fanout.wait` and `fanout.collect` treat like grpc futures (done, cancel, result raising
the call's `grpc.RpcError`), and cancelling one cancels its RPC.

The channels for this loop are opened on it when the broker starts, one per node, with the
same options and credentials as the registry's (`registry.open_channel`), so a bad
certificate fails the start as it does there, never a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from functools import partial

import grpc

from protos import node_pb2, node_pb2_grpc
from server.broker.config import NodeEntry

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SearchCall:
    """One node Search to start: where, what, within how long, with which metadata."""

    node_id: str
    request: node_pb2.SearchRequest
    timeout_s: float
    metadata: Sequence[tuple[str, str]]


class AioCalls:
    """An event loop thread and its `grpc.aio` channel per node. Thread-safe."""

    def __init__(
        self, entries: Sequence[NodeEntry], open_channel: Callable[[NodeEntry], grpc.aio.Channel]
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="broker-aio-calls", daemon=True
        )
        self._thread.start()

        async def open_all() -> dict[str, grpc.aio.Channel]:
            return {entry.id: open_channel(entry) for entry in entries}

        try:
            self._channels = asyncio.run_coroutine_threadsafe(open_all(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self._stubs = {i: node_pb2_grpc.NodeServiceStub(c) for i, c in self._channels.items()}

    def search(self, calls: Sequence[SearchCall]) -> list[Future]:
        """Start every call (on the loop, in one hop); one future per call, in order."""
        futures: list[Future] = [Future() for _ in calls]
        with self._lock:
            if self._closed:
                raise RuntimeError("the broker's node channels are closed")
            self._loop.call_soon_threadsafe(self._start, list(calls), futures)
        return futures

    def _start(self, calls: list[SearchCall], futures: list[Future]) -> None:
        for call, future in zip(calls, futures, strict=True):
            if future.cancelled():  # the broker gave up before the loop got here
                continue
            try:
                rpc = self._stubs[call.node_id].Search(
                    call.request, timeout=call.timeout_s, metadata=call.metadata
                )
                task = asyncio.ensure_future(rpc, loop=self._loop)
            except Exception as err:  # a bug must fail this node's call, not the others'
                log.exception("starting the Search to %s", call.node_id)
                _settle_error(future, NotStarted(err))
                continue
            task.add_done_callback(partial(_settle, future))
            future.add_done_callback(partial(self._cancel_task, task))

    def _cancel_task(self, task: asyncio.Task, future: Future) -> None:
        """The broker cancelled `future` (on its own thread): cancel the RPC on the loop."""
        if future.cancelled():
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the channel
                self._loop.call_soon_threadsafe(task.cancel)

    def close(self) -> None:
        """Close every channel (cancelling calls still in flight), then stop the loop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True

        async def close_all() -> None:
            await asyncio.gather(*(channel.close() for channel in self._channels.values()))

        try:
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(CLOSE_TIMEOUT_S)
        except Exception as err:  # closing must not fail the broker's shutdown
            log.warning("closing node channels: %s", err)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()


class NotStarted(grpc.RpcError):
    """A call the loop could not start; `fanout.collect` reports it like a failed RPC."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        return f"the broker could not start the call: {type(self.cause).__name__}"


def _settle_error(future: Future, err: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # the broker cancelled it meanwhile
        future.set_exception(err)


def _settle(future: Future, task: asyncio.Task) -> None:
    """The RPC ended: hand its answer or error to the broker's future (unless cancelled)."""
    if task.cancelled():
        future.cancel()
        return
    err = task.exception()
    if err is not None:
        _settle_error(future, err)
        return
    with contextlib.suppress(InvalidStateError):
        future.set_result(task.result())
