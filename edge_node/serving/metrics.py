"""Prometheus metrics of one node, in a registry owned by that node.

Why not the global registry: tests (and the simulation) run several nodes in one process;
each node's `/metrics` must show only its own numbers.
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class NodeMetrics:
    """The node's counters and gauges, plus the optional HTTP exporter serving them."""

    def __init__(self, node_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # the standard process_* and python_info metrics
        PlatformCollector(registry=r)
        self.requests = Counter(
            "fedretrieve_node_requests", "RPCs handled", ["method", "code"], registry=r
        )
        self.auth_refused = Counter(
            "fedretrieve_node_auth_refused",
            "Calls refused for a missing or wrong bearer token",
            ["reason"],
            registry=r,
        )
        self.latency = Histogram(
            "fedretrieve_node_request_seconds",
            "RPC latency",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gallery_size = Gauge("fedretrieve_node_gallery_images", "catalog rows", registry=r)
        self.indexed = Gauge("fedretrieve_node_indexed_vectors", "vectors in the index", registry=r)
        self.ingested = Counter("fedretrieve_node_ingested_images", "accepted images", registry=r)
        self.rejected = Counter("fedretrieve_node_rejected_images", "rejected images", registry=r)
        self.reindex_done = Gauge(
            "fedretrieve_node_reindex_done",
            "images re-embedded by the running re-index",
            registry=r,
        )
        self.reindex_total = Gauge(
            "fedretrieve_node_reindex_total", "images the running re-index must embed", registry=r
        )
        self.swaps = Counter("fedretrieve_node_model_swaps", "adapter hot swaps", registry=r)
        self.version = Info("fedretrieve_node_index", "active model/index version", registry=r)
        self.version.info({"node_id": node_id, "model_version": "", "adapter_version": ""})
        self._http = None
        self.port = 0  # bound /metrics port once `serve` ran

    def set_version(self, node_id: str, model_version: str, adapter_version: str) -> None:
        self.version.info(
            {"node_id": node_id, "model_version": model_version, "adapter_version": adapter_version}
        )

    def serve(self, listen: str) -> int:
        """Start `/metrics` on host:port (port 0 picks one); return the bound port."""
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        self._http = server
        self.port = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
