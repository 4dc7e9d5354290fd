"""Prometheus metrics of one broker, in its own CollectorRegistry (no process globals).

Served on a separate port by `server.broker.daemon`; tests read the registry directly.
Besides the broker's own numbers the registry carries the standard process metrics
(`process_*`: CPU, memory, open files; `python_info`), as the default registry would.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BrokerMetrics:
    """Query latency, per-node latency and outcomes, coverage of the last queries."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.query_seconds = Histogram(
            "fedretrieve_broker_query_seconds",
            "Time from receiving a Search to answering it",
            ["merge"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queries = Counter(
            "fedretrieve_broker_queries",
            "Search calls by outcome: ok, or the gRPC status they failed with",
            ["outcome"],
            registry=r,
        )
        self.node_seconds = Histogram(
            "fedretrieve_broker_node_seconds",
            "Per-node Search latency as seen by the broker (answered calls)",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.node_outcomes = Counter(
            "fedretrieve_broker_node_outcomes",
            "Per-node Search outcomes: ok, timed_out, failed",
            ["node", "state"],
            registry=r,
        )
        self.node_errors = Counter(
            "fedretrieve_broker_node_errors",
            "Per-node failed or timed-out Search calls by gRPC status",
            ["node", "code"],
            registry=r,
        )
        self.coverage_ratio = Histogram(
            "fedretrieve_broker_coverage_ratio",
            "Fraction of the selected nodes that answered, per query",
            buckets=(0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
            registry=r,
        )
        self.degraded = Counter(
            "fedretrieve_broker_degraded_queries",
            "Queries answered with a degraded reason",
            ["reason"],
            registry=r,
        )
        self.auth_refused = Counter(
            "fedretrieve_broker_auth_refused",
            "Operator calls refused for a missing or wrong bearer token",
            ["reason"],
            registry=r,
        )
        self.node_healthy = Gauge(
            "fedretrieve_broker_node_healthy",
            "1 when the last periodic health check of the node passed, else 0",
            ["node"],
            registry=r,
        )

    def observe_node(self, node_id: str, state: str, code: str, took_ms: float) -> None:
        self.node_outcomes.labels(node_id, state).inc()
        if state == "ok":
            self.node_seconds.labels(node_id).observe(took_ms / 1000.0)
        else:
            self.node_errors.labels(node_id, code or "UNKNOWN").inc()

    def observe_query(
        self, merge: str, seconds: float, answered: int, total: int, degraded: list[str]
    ) -> None:
        self.query_seconds.labels(merge).observe(seconds)
        self.queries.labels("ok").inc()
        self.coverage_ratio.observe(answered / total if total else 0.0)
        for reason in degraded:
            self.degraded.labels(reason).inc()

    def observe_query_error(self, code: str) -> None:
        """A Search that failed with gRPC status `code` (counted by `Broker.search`)."""
        self.queries.labels(code).inc()
