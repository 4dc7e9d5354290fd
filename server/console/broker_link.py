"""The console's only way out: `server.operator.client.BrokerClient`, one per signed-in
operator (each carries that operator's own token), rebuilt after the broker went away.

A gRPC channel whose peer restarted reconnects by itself, but with exponential backoff (up
to two minutes); a fresh channel connects at once. So after an UNAVAILABLE answer the
operator's client is dropped and the next call builds a new one, which makes a restarted
broker usable on the next page load, and `state()` says whether the broker was reachable
the last time anyone asked (the page's banner).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from common.errors import Unavailable
from protos import broker_pb2
from server.console.config import ConsoleConfig, Operator
from server.operator.client import BrokerClient

T = TypeVar("T")


@dataclass(frozen=True)
class BrokerState:
    up: bool | None  # None: not asked yet
    message: str
    checked: float  # time.time() of the last answer or failure


class BrokerLink:
    def __init__(self, config: ConsoleConfig) -> None:
        self.config = config
        self._clients: dict[str, BrokerClient] = {}
        self._lock = threading.Lock()
        self._state = BrokerState(None, "", 0.0)

    def _client(self, operator: Operator) -> BrokerClient:
        with self._lock:
            client = self._clients.get(operator.name)
            if client is None or client.token != operator.token:
                if client is not None:
                    client.channel.close()
                client = BrokerClient(
                    self.config.broker,
                    token=operator.token,
                    tls=self.config.broker_tls.as_tuple(),
                    connect_timeout=self.config.connect_timeout_s,
                )
                self._clients[operator.name] = client
            return client

    def _drop(self, operator: Operator, client: BrokerClient) -> None:
        with self._lock:
            if self._clients.get(operator.name) is client:
                del self._clients[operator.name]
        client.channel.close()

    def call(self, operator: Operator, fn: Callable[[BrokerClient], T]) -> T:
        client = self._client(operator)
        try:
            result = fn(client)
        except Unavailable as err:
            # a fresh channel next time (no reconnect backoff); the broker itself is down
            # unless it answered UNAVAILABLE for its nodes (none answered, coverage short)
            self._drop(operator, client)
            if _nodes_unavailable(str(err)):
                raise
            self._state = BrokerState(False, str(err), time.time())
            if str(err).startswith("cannot reach the broker"):
                raise
            raise Unavailable(
                f"the broker at {self.config.broker} is not reachable ({err}); the console "
                "reconnects by itself: try again once it is back"
            ) from None
        self._state = BrokerState(True, "", time.time())
        return result

    def state(self) -> BrokerState:
        return self._state

    # ---------------------------------------------------------------- the calls
    def search(self, operator: Operator, request: broker_pb2.BrokerSearchRequest):
        return self.call(operator, lambda c: c.search(request))

    def search_similar(self, operator: Operator, request: broker_pb2.SearchSimilarRequest):
        return self.call(operator, lambda c: c.search_similar(request))

    def thumbnail(self, operator: Operator, node_id: str, image_id: int, max_side: int):
        return self.call(operator, lambda c: c.thumbnail(node_id, image_id, max_side))

    def status(self, operator: Operator) -> broker_pb2.BrokerStatusResponse:
        return self.call(operator, lambda c: c.status())

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.channel.close()


def _nodes_unavailable(message: str) -> bool:
    """The broker's own UNAVAILABLE answers (it is up; its nodes are not)."""
    return "no node answered" in message or "coverage" in message
