"""Metrics that tell the truth (issue 17, item 9), read from real brokers and nodes on loopback.

- `fedretrieve_broker_node_healthy` follows the periodic health checks: nobody calls Status.
- `fedretrieve_broker_queries_total` counts Search calls only, not GetThumbnail outcomes.
- Node and broker registries carry the standard process metrics.
"""

from __future__ import annotations

import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from broker_fixtures import ScriptedNode, broker_config, closed_port_address
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import broker_pb2, node_pb2_grpc

pytestmark = pytest.mark.timeout(60)

HEALTHY = "fedretrieve_broker_node_healthy"
QUERIES = "fedretrieve_broker_queries_total"


def serve_scripted(servicer: ScriptedNode, port: int = 0) -> tuple[grpc.Server, int]:
    """A ScriptedNode with a SERVING health service on 127.0.0.1:`port` (0: any)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"could not bind 127.0.0.1:{port}"
    server.start()
    return server, bound


def wait_for_value(registry, name: str, labels: dict, want: float, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    seen = registry.get_sample_value(name, labels)
    while seen != want:
        assert time.monotonic() < deadline, f"{name}{labels} is {seen}, not {want}"
        time.sleep(0.05)
        seen = registry.get_sample_value(name, labels)


def test_node_healthy_gauge_follows_the_health_checks(start_broker):
    servicer = ScriptedNode("up", [(1, 0.5)])
    server, port = serve_scripted(servicer)
    try:
        config = broker_config(
            {"up": f"127.0.0.1:{port}", "down": closed_port_address()},
            health_interval_s=0.1,
            health_timeout_s=0.5,
        )
        handle = start_broker(config, health_checks=True)
        registry = handle.broker.metrics.registry
        # no Status call anywhere in this test: only the periodic checks move the gauge
        wait_for_value(registry, HEALTHY, {"node": "up"}, 1.0)
        wait_for_value(registry, HEALTHY, {"node": "down"}, 0.0)

        server.stop(None).wait()  # the node dies ...
        wait_for_value(registry, HEALTHY, {"node": "up"}, 0.0)
        server, again = serve_scripted(servicer, port)  # ... and comes back on its port
        assert again == port
        wait_for_value(registry, HEALTHY, {"node": "up"}, 1.0)
    finally:
        server.stop(None)


def test_queries_total_counts_searches_not_thumbnails(scripted_nodes, start_broker):
    (a,) = scripted_nodes(ScriptedNode("a", [(1, 0.9), (2, 0.4)], no_thumbnail={2}))
    handle = start_broker(broker_config({"a": a.address}))
    registry = handle.broker.metrics.registry
    handle.stub.GetThumbnail(
        broker_pb2.BrokerThumbnailRequest(node_id="a", image_id=1), metadata=handle.auth()
    )
    for image_id in (2, 99):  # the node has no such thumbnail: NOT_FOUND through the broker
        with pytest.raises(grpc.RpcError) as err:
            handle.stub.GetThumbnail(
                broker_pb2.BrokerThumbnailRequest(node_id="a", image_id=image_id),
                metadata=handle.auth(),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError):  # an unknown node is refused by the broker itself
        handle.stub.GetThumbnail(
            broker_pb2.BrokerThumbnailRequest(node_id="ghost", image_id=1),
            metadata=handle.auth(),
        )
    handle.stub.Status(broker_pb2.BrokerStatusRequest(), metadata=handle.auth())
    outcomes = {
        s.labels["outcome"]: s.value
        for metric in registry.collect()
        if metric.name == "fedretrieve_broker_queries"
        for s in metric.samples
        if s.name == QUERIES
    }
    assert outcomes == {}, outcomes  # no Search was made

    handle.stub.Search(broker_pb2.BrokerSearchRequest(text="red", k=2), metadata=handle.auth())
    with pytest.raises(grpc.RpcError) as err:
        handle.stub.Search(broker_pb2.BrokerSearchRequest(text="red", k=0), metadata=handle.auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert registry.get_sample_value(QUERIES, {"outcome": "ok"}) == 1.0
    assert registry.get_sample_value(QUERIES, {"outcome": "INVALID_ARGUMENT"}) == 1.0


def test_broker_metrics_endpoint_has_process_metrics(scripted_nodes, start_broker):
    (a,) = scripted_nodes(ScriptedNode("a", [(1, 0.9)]))
    handle = start_broker(broker_config({"a": a.address}, metrics_port=0))
    port = handle.broker.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    lines = {line.split(" ")[0].split("{")[0] for line in text.splitlines() if line[:1] != "#"}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= lines
    assert HEALTHY in lines  # set for every node from the start (unknown: 0)


def test_node_registry_has_process_metrics(tmp_path):
    from edge_node.serving.metrics import NodeMetrics

    first, second = NodeMetrics("n1"), NodeMetrics("n2")  # two nodes in one process
    for metrics in (first, second):
        assert metrics.registry.get_sample_value("process_resident_memory_bytes") > 0
        assert metrics.registry.get_sample_value("python_info", _python_labels()) == 1.0


def _python_labels() -> dict:
    import platform

    major, minor, patch = platform.python_version_tuple()
    return {
        "implementation": platform.python_implementation(),
        "major": major,
        "minor": minor,
        "patchlevel": patch,
        "version": platform.python_version(),
    }
