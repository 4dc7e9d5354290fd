"""The broker process: gRPC server, operator auth, health, reflection, metrics, shutdown.

`create_server(config)` builds everything, binds, starts and returns
`(server, port, broker)`; `serve(config)` is what `fedretrieve broker serve` runs. The
servicer only translates between protos and `Broker`; errors leave through one mapping
(`common.errors.status_code_for`), unexpected ones as INTERNAL without a stack trace.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import ConfigError, FedRetrieveError, status_code_for
from protos import broker_pb2, broker_pb2_grpc
from server.broker.broker import Broker, TextEncoder, logfmt, new_query_id
from server.broker.config import BrokerConfig
from server.broker.metrics import BrokerMetrics
from server.broker.model_watch import ModelWatcher
from server.broker.registry import NodeRegistry

log = logging.getLogger(__name__)

BROKER_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["BrokerService"].full_name
# Callable without an operator token: load balancers and grpcurl's `list`/`describe`.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
QUERY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class OperatorAuth(grpc.ServerInterceptor):
    """Bearer-token check for every BrokerService call (UNAUTHENTICATED otherwise)."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)

    def _allowed(self, metadata: tuple[Any, ...]) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                offered = value[len("Bearer ") :].strip().encode()
                # compare against every token so timing does not reveal which one matched
                matches = [hmac.compare_digest(offered, t) for t in self._tokens]
                return any(matches)
        return False

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES) or self._allowed(
            handler_call_details.invocation_metadata
        ):
            return continuation(handler_call_details)
        log.warning(logfmt("auth_refused", method=method))
        return grpc.unary_unary_rpc_method_handler(_refuse)


def _refuse(request, context):
    context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or unknown operator token: send `authorization: Bearer <token>`",
    )


def _translated(method: Callable) -> Callable:
    """Map domain errors and nodes' statuses to gRPC statuses, in one place."""

    @functools.wraps(method)
    def wrapper(self: BrokerServicer, request, context):
        try:
            return method(self, request, context)
        except FedRetrieveError as err:
            code = status_code_for(err)
            self.broker.metrics.observe_error(code.name)
            context.abort(code, str(err))
        except grpc.RpcError as err:  # a proxied node call (GetThumbnail) failed
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            node_id = getattr(request, "node_id", "?")
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # not the operator's fault: the broker's credentials for that node are wrong
                code, details = (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"refused the broker: {details}",
                )
            self.broker.metrics.observe_error(code.name)
            context.abort(code, f"node {node_id}: {details}")
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            self.broker.metrics.observe_error("INTERNAL")
            context.abort(grpc.StatusCode.INTERNAL, "internal broker error (see the broker's log)")

    return wrapper


class BrokerServicer(broker_pb2_grpc.BrokerServiceServicer):
    """Thin gRPC adapter over `Broker`."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @_translated
    def Search(self, request, context):
        query_id = new_query_id()
        for key, value in context.invocation_metadata() or ():
            if key == "x-query-id" and QUERY_ID_RE.match(value):
                query_id = value  # an operator-chosen id, carried to the nodes' logs
        remaining = context.time_remaining()
        caller_remaining = None if remaining is None or remaining > 1e8 else remaining
        return self.broker.search(request, query_id=query_id, caller_remaining_s=caller_remaining)

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

    interceptors = [OperatorAuth(config.operator_tokens)] if config.operator_tokens else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="broker"),
        interceptors=interceptors,
        options=server_options(config),
    )
    broker_pb2_grpc.add_BrokerServiceServicer_to_server(BrokerServicer(broker), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", BROKER_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (BROKER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    if config.tls is None:
        port = server.add_insecure_port(config.listen)
    else:
        credentials = grpc.ssl_server_credentials(
            [(config.tls.read("key"), config.tls.read("cert"))],
            root_certificates=config.tls.read("ca"),
            require_client_auth=config.tls.ca is not None,
        )
        port = server.add_secure_port(config.listen, credentials)
    if not port:
        registry.close()
        raise ConfigError(f"cannot listen on {config.listen} (address in use or not local?)")

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
    stopping = threading.Event()

    def on_signal(signum, _frame):
        log.info(logfmt("broker_stopping", signal=signal.Signals(signum).name))
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"broker listening on port {port} ({len(config.nodes)} nodes); Ctrl-C to stop", flush=True
    )
    stopping.wait()
    stop_server(server, broker, grace=5.0)
    return 0
