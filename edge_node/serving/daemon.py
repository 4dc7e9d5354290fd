"""The node daemon's entry point: build the node, wire the gRPC server, serve until SIGTERM.

`create_server(config)` returns `(server, port, node)` without starting the server, so
tests bind 127.0.0.1:0 and drive a real server; `serve(config)` is what
`fedretrieve node serve` runs. Shutdown order matters: stop accepting calls and let
in-flight ones finish (grace period), then stop the workers, save the index and
checkpoint the catalog.

Imports of `.node` (and so faiss) happen inside the functions: `serve` sets logging up
first, so faiss's loader chatter is filtered before faiss is ever imported.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent import futures
from typing import TYPE_CHECKING

import grpc

from common.errors import ConfigError
from common.rpc.auth import RpcGuard, server_credentials
from common.rpc.server import add_health_and_reflection, bind, wait_for_stop_signal
from edge_node.config import NodeConfig
from protos import node_pb2_grpc

from .service import SERVICE_NAME, NodeServicer, query_id_var

if TYPE_CHECKING:
    from .node import BackendFactory, Node

log = logging.getLogger(__name__)


def create_server(
    config: NodeConfig,
    node: Node | None = None,
    backend_factory: BackendFactory | None = None,
) -> tuple[grpc.Server, int, Node]:
    """Open (or take) the node, start its workers and metrics, and bind a gRPC server with
    NodeService, health and reflection. The caller starts the server."""
    from .node import Node

    node = node or Node.open(config, backend_factory)
    token = config.auth.resolved_token()
    metrics = node.metrics
    # One interceptor, token or not: it also turns undecodable request bytes into
    # INVALID_ARGUMENT. Reflection needs the token too (common/rpc/auth.py says why).
    guard = RpcGuard(
        (token,) if token else (),
        on_refused=lambda _method, reason: metrics.auth_refused.labels(reason).inc(),
    )
    max_bytes = config.limits.max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.limits.grpc_workers, thread_name_prefix=f"{config.node_id}-rpc"
        ),
        interceptors=[guard],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail, not share
        ],
    )
    node_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(node), server)
    add_health_and_reflection(server, (SERVICE_NAME,))
    auth = config.auth
    try:
        port = bind(
            server,
            config.listen,
            server_credentials(auth.tls_cert, auth.tls_key, auth.tls_client_ca),
        )
    except ConfigError:
        node.close()
        raise
    if config.metrics_listen:
        node.metrics.serve(config.metrics_listen)
    if not config.auth.has_credentials:
        log.warning(
            "node %s is running WITHOUT authentication on %s: anyone who can connect may "
            "search, ingest and fetch thumbnails of its raw images; set [auth] token-file "
            "(or tls-client-ca for mTLS)%s",
            config.node_id, config.listen,
            " (allow-unauthenticated = true)" if config.auth.allow_unauthenticated else "",
        )  # fmt: skip
    elif not token:
        log.info("node %s: callers authenticate by client certificate (mTLS)", config.node_id)
    node.start()
    return server, port, node


def shutdown(server: grpc.Server, node: Node, grace_s: float) -> None:
    """Let in-flight calls finish within `grace_s`, then stop workers and flush to disk."""
    server.stop(grace_s).wait()
    node.close()


class KeyValueFormatter(logging.Formatter):
    """`time level logger node=... query_id=...: message`, or one JSON object a line."""

    def __init__(self, node_id: str, as_json: bool) -> None:
        super().__init__()
        self.node_id = node_id
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        query_id = query_id_var.get()
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        when += f".{int(record.msecs):03d}"
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(
                {
                    "ts": when,
                    "level": record.levelname,
                    "logger": record.name,
                    "node": self.node_id,
                    "query_id": query_id,
                    "thread": record.threadName,
                    "msg": message,
                }
            )
        return (
            f"{when} {record.levelname} {record.name} node={self.node_id} "
            f"query_id={query_id}: {message}"
        )


def configure_logging(config: NodeConfig) -> None:
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = KeyValueFormatter(config.node_id, config.log_format == "json")
    for handler in root.handlers:
        handler.setFormatter(formatter)
    # faiss's loader logs each CPU-specific build it tries (AVX-512, AVX2, generic), with a
    # ModuleNotFoundError for each one not installed: eight INFO lines an operator cannot
    # act on. `serve` logs the one that matters (which build loaded) after importing it.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _faiss_build() -> str:
    """ "faiss 1.8.0 (avx2 build)": the one loader fact worth a line."""
    import sys

    import faiss

    builds = [m.rpartition("_")[2] for m in sys.modules if m.startswith("faiss.swigfaiss_")]
    return f"faiss {getattr(faiss, '__version__', '?')} ({(builds or ['generic'])[0]} build)"


def serve(config: NodeConfig) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    configure_logging(config)  # before faiss is imported (below, or by create_server)
    log.info("%s", _faiss_build())
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    if config.faiss_threads:
        # Process-wide, hence here at the entry point. Searches arrive one query per call;
        # an OpenMP team per query costs more than it saves (measured: 100k x 256 flat,
        # 2 busy cores, 45 ms with 1 thread vs 181 ms with 2).
        import faiss

        faiss.omp_set_num_threads(config.faiss_threads)
    server, port, node = create_server(config)
    server.start()
    host = config.listen.rpartition(":")[0]
    log.info(
        "node %s serving on %s:%d (model %s, %d images)",
        config.node_id, host, port, node.active.version, len(node.gallery),
    )  # fmt: skip
    print(f"READY {host}:{port}", flush=True)  # a line supervisors and tests can wait for
    name = wait_for_stop_signal()
    log.info("received %s; shutting down (grace %.0fs)", name, config.grace_s)
    shutdown(server, node, config.grace_s)
    log.info("node %s stopped cleanly", config.node_id)
    return 0
