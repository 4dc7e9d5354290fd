"""The broker's view of the edge nodes: one long-lived channel each, and their health.

A channel per node is opened once and kept (HTTP/2 connection reuse, keepalive pings);
retries happen inside gRPC, only on UNAVAILABLE, through the channel's service config,
and always within the caller's deadline. A background thread checks every node with the
standard `grpc.health.v1` service and asks `NodeService.Status` for its gallery size and
model version; every finished check is also reported to the health listener (the broker's
`fedretrieve_broker_node_healthy` gauge), so the metric follows the checks, not whoever
asks for Status. Health is advisory: the broker still sends every query to every selected
node, so a node that comes back is used at once and a wrongly-unhealthy one is not lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import node_pb2, node_pb2_grpc
from server.broker.aio_calls import AioCalls
from server.broker.config import BrokerConfig, NodeEntry

log = logging.getLogger(__name__)

NODE_SERVICE = "fedretrieve.v1.NodeService"


def channel_options(config: BrokerConfig) -> list[tuple[str, object]]:
    """Options for a broker -> node channel: keepalive, fast reconnect, UNAVAILABLE retries."""
    method: dict[str, object] = {"name": [{"service": NODE_SERVICE}]}
    if config.retry_max_attempts > 1:  # gRPC refuses a retry policy of one attempt
        method["retryPolicy"] = {
            "maxAttempts": config.retry_max_attempts,
            "initialBackoff": "0.02s",
            "maxBackoff": "0.2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    service_config = {"methodConfig": [method]}
    return [
        ("grpc.enable_retries", 1 if config.retry_max_attempts > 1 else 0),
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        # Pings only while calls are in flight: nodes' default server policy refuses idle
        # pings (GOAWAY too_many_pings); idle liveness is what the health checks are for.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        # A node that was down is reconnected within seconds, not gRPC's default 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]


def open_channel(
    entry: NodeEntry, config: BrokerConfig, api: ModuleType = grpc
) -> grpc.Channel | grpc.aio.Channel:
    """A channel to `entry`: `api` is `grpc` (sync: health checks, Status, thumbnails) or
    `grpc.aio` (the Search fan-out, opened on its loop); the same options and credentials."""
    options = channel_options(config)
    if entry.tls is None:
        return api.insecure_channel(entry.address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=entry.tls.read("ca"),
        private_key=entry.tls.read("key"),
        certificate_chain=entry.tls.read("cert"),
    )
    if entry.tls.server_name:
        options.append(("grpc.ssl_target_name_override", entry.tls.server_name))
    return api.secure_channel(entry.address, credentials, options=options)


@dataclass
class NodeState:
    """What the last health check learned (mutable; guarded by the registry's lock)."""

    healthy: bool = False
    state: str = "UNKNOWN"  # health-check status name, or the gRPC code that failed it
    last_check: float | None = None  # time.monotonic() of the last finished check
    last_error: str = ""
    gallery_size: int = 0
    model_version: str = ""
    cameras: tuple[str, ...] | None = None  # from Status; None: not known yet
    indexed_size: int = 0  # the rest from Status too, for the operator's fleet view
    adapter_version: str = ""
    camera_norm_version: str = ""  # "" = the node does not normalise cameras
    reindex: tuple[bool, int, int] = (False, 0, 0)  # running, done, total
    vector_only: bool = False  # no text tower: answers only vectors of its model version
    query_version: str = ""  # query vectors it accepts: model_version, or a student's teacher's


class NodeClient:
    """One node: its config entry, channel, stubs, call metadata and last known state."""

    def __init__(self, entry: NodeEntry, config: BrokerConfig) -> None:
        self.entry = entry
        self.channel = open_channel(entry, config)
        self.stub = node_pb2_grpc.NodeServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.state = NodeState()

    @property
    def id(self) -> str:
        return self.entry.id

    def metadata(self, query_id: str | None = None) -> list[tuple[str, str]]:
        """Per-call metadata: the node's bearer token and the query id for its logs."""
        md = []
        if self.entry.token:
            md.append(("authorization", f"Bearer {self.entry.token}"))
        if query_id:
            md.append(("x-query-id", query_id))
        return md


class NodeRegistry:
    """All configured nodes and the health-check thread that watches them."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self._nodes = {entry.id: NodeClient(entry, config) for entry in config.nodes}
        # the Search fan-out's channels, on one asyncio loop (server/broker/aio_calls.py)
        self.calls = AioCalls(config.nodes, partial(open_channel, config=config, api=grpc.aio))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_health: Callable[[str, bool], None] | None = None
        self._after_checks: Callable[[], None] | None = None

    def watch_health(self, listener: Callable[[str, bool], None]) -> None:
        """Call `listener(node_id, healthy)` after every health check of every node (and
        once now, for each node's current state: unknown counts as unhealthy)."""
        self._on_health = listener
        for node_id in self.ids:
            listener(node_id, self.snapshot(node_id).healthy)

    def after_checks(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every finished round of health checks, on the checking
        thread: the broker verifies student nodes there, never on the query path."""
        self._after_checks = listener

    # ------------------------------------------------------------------ lookup
    @property
    def ids(self) -> list[str]:
        return list(self._nodes)

    def get(self, node_id: str) -> NodeClient:
        return self._nodes[node_id]

    def select(self, node_ids: Sequence[str]) -> list[NodeClient]:
        """The nodes a query goes to (all when `node_ids` is empty), in config order.

        Raises KeyError listing the ids that are not registered.
        """
        if not node_ids:
            return list(self._nodes.values())
        unknown = sorted(set(node_ids) - set(self._nodes))
        if unknown:
            raise KeyError(unknown)
        wanted = set(node_ids)
        return [node for node_id, node in self._nodes.items() if node_id in wanted]

    def snapshot(self, node_id: str) -> NodeState:
        with self._lock:
            return dataclasses.replace(self._nodes[node_id].state)

    def learn(self, node_id: str, *, gallery_size: int, model_version: str) -> None:
        """Record what a successful search told us, so coverage of a later miss is right."""
        with self._lock:
            state = self._nodes[node_id].state
            state.gallery_size = gallery_size
            state.model_version = model_version

    # ------------------------------------------------------------------ health
    def check_all(self) -> None:
        """One round of health checks, all nodes concurrently, bounded by the health timeout."""
        timeout = self.config.health_timeout_s
        pending = []
        for node in self._nodes.values():
            health = node.health.Check.future(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout, metadata=node.metadata()
            )
            status = node.stub.Status.future(
                node_pb2.StatusRequest(), timeout=timeout, metadata=node.metadata()
            )
            pending.append((node, health, status))
        for node, health, status in pending:
            self._record(node, health, status)
        listener = self._after_checks
        if listener is not None:
            listener()

    def _record(self, node: NodeClient, health: grpc.Future, status: grpc.Future) -> None:
        now = time.monotonic()
        try:
            reply = health.result()
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            state_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            error = ""
        except grpc.RpcError as err:
            serving, state_name = False, err.code().name
            error = f"{err.code().name}: {err.details()}"
        try:
            node_status = status.result()
        except grpc.RpcError as err:
            node_status = None
            if serving:  # healthy transport but Status refused: keep the reason visible
                error = f"Status {err.code().name}: {err.details()}"
        with self._lock:
            was = node.state.healthy
            node.state.healthy = serving
            node.state.state = state_name
            node.state.last_check = now
            node.state.last_error = error
            if node_status is not None:
                node.state.gallery_size = int(node_status.gallery_size)
                node.state.model_version = node_status.model_version
                node.state.indexed_size = int(node_status.indexed_size)
                node.state.adapter_version = node_status.adapter_version
                node.state.camera_norm_version = node_status.camera_norm_version
                node.state.vector_only = bool(node_status.vector_only)
                # "" from a node older than the field: it accepts its own version only
                node.state.query_version = node_status.query_version or node_status.model_version
                r = node_status.reindex
                node.state.reindex = (bool(r.running), int(r.done), int(r.total))
                cameras = tuple(node_status.camera_ids)
                # an empty list from a non-empty gallery means "not reported": keep unknown
                known = bool(cameras) or node_status.gallery_size == 0
                node.state.cameras = cameras if known else None
        if was != serving:
            log.info(
                "node_health node=%s healthy=%s state=%s %s", node.id, serving, state_name, error
            )
        listener = self._on_health
        if listener is not None:
            listener(node.id, serving)

    def start(self) -> None:
        """Start the periodic health checks (first round right away, in the background)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="node-health", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_all()
            except Exception:  # a bug here must not end health checking; it is logged loudly
                log.exception("health check round failed")
            self._stop.wait(self.config.health_interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.health_timeout_s + 1)
            self._thread = None
        self.calls.close()
        for node in self._nodes.values():
            node.channel.close()
