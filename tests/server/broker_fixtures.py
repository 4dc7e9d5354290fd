"""Fixtures for broker tests: real gRPC servers on loopback.

`ScriptedNode` is a test-only NodeService that answers from a fixed list of hits. It exists
for the cases a healthy real node cannot produce on demand: a node that hangs, a node on
another model version, a node whose calls we want to inspect. Everything that is about
retrieval quality runs against the real node daemon instead (test_broker_real_nodes.py).
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from protos import broker_pb2_grpc, node_pb2, node_pb2_grpc, retrieval_pb2
from server.broker.config import BrokerConfig, NodeEntry
from server.broker.daemon import create_server, stop_server

OPERATOR_TOKEN = "operator-secret"


@dataclass
class ScriptedNode(node_pb2_grpc.NodeServiceServicer):
    node_id: str
    hits: list[tuple[int, float]]  # (image_id, score), best first
    model_version: str = "v1"
    delay_s: float = 0.0  # > 0: the node "hangs" this long before answering
    gallery_size: int = 100
    no_thumbnail: set[int] = field(default_factory=set)  # listed by Search, no thumbnail
    calls: list[tuple[node_pb2.SearchRequest, dict[str, str]]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def Search(self, request, context):
        self.calls.append((request, dict(context.invocation_metadata())))
        if self.delay_s:
            self.release.wait(self.delay_s)
        used_vector = request.vector.model_version == self.model_version and bool(
            request.vector.values
        )
        response = node_pb2.SearchResponse(
            model_version=self.model_version,
            gallery_size=self.gallery_size,
            vectors_searched=self.gallery_size,
            used_vector=used_vector,
            took_ms=1.0,
        )
        for image_id, score in self.hits[: request.k]:
            response.hits.add(
                node_id="node-side-name",  # the broker must re-key hits by its own node id
                image_id=image_id,
                camera_id=f"cam-{self.node_id}",
                timestamp_ms=1_700_000_000_000 + image_id,
                score=score,
                file_name=f"{self.node_id}_{image_id}.jpg",
            )
        return response

    def GetThumbnail(self, request, context):
        if request.image_id not in {i for i, _ in self.hits} - self.no_thumbnail:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no image {request.image_id}")
        buf = io.BytesIO()
        Image.new("RGB", (32, 64), (200, 30, 30)).save(buf, format="JPEG")
        return retrieval_pb2.ThumbnailResponse(
            jpeg=buf.getvalue(),
            width=32,
            height=64,
            camera_id=f"cam-{self.node_id}",
            file_name="x.jpg",
        )

    def Status(self, request, context):
        return node_pb2.StatusResponse(
            node_id=self.node_id,
            gallery_size=self.gallery_size,
            model_version=self.model_version,
            camera_ids=[f"cam-{self.node_id}"],
        )


@dataclass
class RunningNode:
    servicer: ScriptedNode
    server: grpc.Server
    address: str


def start_scripted_node(servicer: ScriptedNode) -> RunningNode:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return RunningNode(servicer, server, f"127.0.0.1:{port}")


def closed_port_address() -> str:
    """A loopback address where nothing listens (a node that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def broker_config(
    addresses: dict[str, str], node_token: str | None = None, **overrides
) -> BrokerConfig:
    """A test broker config; each node's token is `node_token` or `token-<id>`."""
    values = dict(
        nodes=tuple(
            NodeEntry(id=i, address=a, token=node_token or f"token-{i}")
            for i, a in addresses.items()
        ),
        listen="127.0.0.1:0",
        operator_tokens=(OPERATOR_TOKEN,),
        default_deadline_ms=1500,
        merge_margin_ms=20,
        health_interval_s=60.0,
    )
    values.update(overrides)
    return BrokerConfig(**values)


@dataclass
class BrokerHandle:
    stub: broker_pb2_grpc.BrokerServiceStub
    channel: grpc.Channel
    broker: object
    port: int
    address: str

    def auth(self, query_id: str | None = None) -> list[tuple[str, str]]:
        md = [("authorization", f"Bearer {OPERATOR_TOKEN}")]
        if query_id:
            md.append(("x-query-id", query_id))
        return md


@pytest.fixture
def scripted_nodes() -> Iterator[callable]:
    """Factory: start ScriptedNodes; all stopped (and hangs released) at teardown."""
    started: list[RunningNode] = []

    def start(*servicers: ScriptedNode) -> list[RunningNode]:
        nodes = [start_scripted_node(s) for s in servicers]
        started.extend(nodes)
        return nodes

    yield start
    for node in started:
        node.servicer.release.set()
        node.server.stop(None)


@pytest.fixture
def start_broker() -> Iterator[callable]:
    """Factory: start a broker for a config (encoder optional); stopped at teardown."""
    running = []

    def start(config: BrokerConfig, encoder=None, health_checks: bool = False) -> BrokerHandle:
        server, port, broker = create_server(config, encoder=encoder, health_checks=health_checks)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        running.append((server, broker, channel))
        return BrokerHandle(
            broker_pb2_grpc.BrokerServiceStub(channel), channel, broker, port, f"127.0.0.1:{port}"
        )

    yield start
    for server, broker, channel in running:
        channel.close()
        stop_server(server, broker, grace=None)


def elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


@pytest.fixture(scope="session")
def tiny_model():
    """The real tiny model from common/model_configs (random init, no download)."""
    import torch

    from common.factory import create_model

    torch.set_num_threads(1)
    return create_model("tiny")


CROP_COLOURS = [
    (200, 30, 30),
    (30, 40, 200),
    (30, 160, 40),
    (15, 15, 15),
    (235, 235, 235),
    (220, 210, 40),
]


def crop(seed: int) -> bytes:
    """A small synthetic person crop: coloured top and trousers on a noisy background,
    PNG (lossless: node, broker and offline code embed identical pixels)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(60, 200, size=(64, 32, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([8, 12, 24, 34], fill=CROP_COLOURS[seed % 6])
    draw.rectangle([10, 34, 22, 62], fill=CROP_COLOURS[(seed // 6) % 6])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
