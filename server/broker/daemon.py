"""The broker process: gRPC server, operator auth, health, reflection, metrics, shutdown.

`create_server(config)` builds everything, binds, starts and returns
`(server, port, broker)`; `serve(config)` is what `fedretrieve broker serve` runs. The
servicer only translates between protos and `Broker`; errors leave through the project's
one mapping (`common.rpc.errors.translate_errors`, shared with the node), unexpected ones
as INTERNAL without a stack trace. Auth, health and reflection are `common.rpc`'s too.
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Any

import grpc

from common.errors import ConfigError
from common.rpc.auth import REFLECTION_PREFIX, RpcGuard, server_credentials
from common.rpc.errors import translate_errors
from common.rpc.query_id import is_valid_query_id
from common.rpc.server import add_health_and_reflection, bind, wait_for_stop_signal
from protos import broker_pb2, broker_pb2_grpc
from server.broker.broker import Broker, TextEncoder, logfmt, new_query_id
from server.broker.config import BrokerConfig
from server.broker.metrics import BrokerMetrics
from server.broker.model_watch import ModelWatcher
from server.broker.registry import NodeRegistry

log = logging.getLogger(__name__)

BROKER_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name
# Callable without an operator token besides health: grpcurl's `list`/`describe` (the
# open-method policy is in common/rpc/auth.py).
OPEN_METHOD_PREFIXES = (REFLECTION_PREFIX,)


def _node_status(err: grpc.RpcError, request: Any) -> tuple[grpc.StatusCode, str]:
    """The status a failed proxied node call (GetThumbnail) leaves with, naming the node."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # not the operator's fault: the broker's credentials for that node are wrong
        code, details = grpc.StatusCode.FAILED_PRECONDITION, f"refused the broker: {details}"
    return code, f"node {getattr(request, 'node_id', '?')}: {details}"


# The project's one error mapping (common.rpc.errors), with the broker's hooks.
_translated = translate_errors("broker", map_rpc_error=_node_status)


def _call_scope(context: grpc.ServicerContext) -> tuple[str, float | None]:
    """The query id (an operator-chosen `x-query-id`, carried to the nodes' logs, when it
    is valid by the nodes' rule too) and the caller's own remaining deadline, if any."""
    query_id = new_query_id()
    for key, value in context.invocation_metadata() or ():
        if key == "x-query-id" and is_valid_query_id(value):
            query_id = value
    remaining = context.time_remaining()
    return query_id, None if remaining is None or remaining > 1e8 else remaining


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Thin gRPC adapter over `Broker`."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @_translated
    def Search(self, request, context):
        query_id, remaining = _call_scope(context)
        return self.broker.search(request, query_id=query_id, caller_remaining_s=remaining)

    @_translated
    def SearchSimilar(self, request, context):
        query_id, remaining = _call_scope(context)
        return self.broker.search_similar(request, query_id=query_id, caller_remaining_s=remaining)

    @_translated
    def GetThumbnail(self, request, context):
        return self.broker.thumbnail(request)

    @_translated
    def Status(self, request, context):
        return self.broker.status()


def server_options(config: BrokerConfig) -> list[tuple[str, Any]]:
    """Keepalive on the operator side: accept operators' pings every 5 s or more."""
    return [
        ("grpc.keepalive_time_ms", config.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def create_server(
    config: BrokerConfig,
    *,
    encoder: TextEncoder | str | None = "from-config",
    health_checks: bool = True,
) -> tuple[grpc.Server, int, Broker]:
    """Build, bind and start the broker. Returns (server, bound port, broker).

    `encoder` overrides the configured model (tests pass a model they built); the default
    loads `config.model` + the newest adapter at `config.adapter` through `common.factory`
    and reloads it when a newer global adapter appears (server/broker/model_watch.py). Stop with
    `stop_server(server, broker)`.
    """
    watcher = ModelWatcher(config, on_model=lambda model: broker.set_encoder(model))
    model = watcher.load_initial() if encoder == "from-config" else encoder
    metrics = BrokerMetrics()
    registry = NodeRegistry(config)
    broker = Broker(config, registry, encoder=model, metrics=metrics)  # type: ignore[arg-type]
    if encoder == "from-config":  # follow the global adapter as federated rounds finish
        watcher.start()
        broker.add_closer(watcher.close)

    # One interceptor, tokens or not (allow-unauthenticated): it also turns undecodable
    # request bytes into INVALID_ARGUMENT, and counts refused operators.
    guard = RpcGuard(
        config.operator_tokens,
        open_prefixes=OPEN_METHOD_PREFIXES,
        token_name="operator",
        on_refused=lambda _method, reason: metrics.auth_refused.labels(reason).inc(),
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="broker"),
        interceptors=[guard],
        options=server_options(config),
    )
    broker_pb2_grpc.add_BrokerServiceServicer_to_server(BrokerServicer(broker), server)
    add_health_and_reflection(server, (BROKER_SERVICE,))

    tls = config.tls
    try:
        credentials = server_credentials(tls.cert, tls.key, tls.ca) if tls else None
        port = bind(server, config.listen, credentials)
    except ConfigError:
        broker.close()  # node channels, health checks and the adapter watcher
        raise

    broker.metrics_port = _start_metrics(config, metrics, broker)
    server.start()
    if health_checks:
        registry.start()
    if not config.operator_tokens:
        log.warning("broker is running WITHOUT operator authentication (allow-unauthenticated)")
    log.info(
        logfmt(
            "broker_started",
            port=port,
            nodes=len(config.nodes),
            model=broker.model_version or "none",
            tls="mtls" if config.tls and config.tls.ca else ("tls" if config.tls else "off"),
            metrics_port=broker.metrics_port or "off",
        )
    )
    return server, port, broker


def _start_metrics(config: BrokerConfig, metrics: BrokerMetrics, broker: Broker) -> int | None:
    if config.metrics_port is None:
        return None
    from prometheus_client import start_http_server

    host = config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
    http_server, _thread = start_http_server(
        config.metrics_port, addr=host, registry=metrics.registry
    )
    broker.add_closer(http_server.shutdown)
    return int(http_server.server_port)


def stop_server(server: grpc.Server, broker: Broker, grace: float | None = 1.0) -> None:
    """Finish in-flight calls (up to `grace` s), then close node channels and metrics."""
    server.stop(grace).wait()
    broker.close()


def serve(config: BrokerConfig) -> int:
    """Run until SIGTERM/SIGINT; finish in-flight queries before exiting."""
    server, port, broker = create_server(config)
    print(
        f"broker listening on port {port} ({len(config.nodes)} nodes); Ctrl-C to stop", flush=True
    )
    name = wait_for_stop_signal()
    log.info(logfmt("broker_stopping", signal=name))
    stop_server(server, broker, grace=5.0)
    return 0
