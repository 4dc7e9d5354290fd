"""Node test helpers and fixtures: generated crops, real node servers on loopback (tiny model)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw

from edge_node.config import AuthSettings, IndexSettings, NodeConfig
from protos import node_pb2, node_pb2_grpc

TOKEN = "test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
COLOURS = {
    "red": (200, 30, 30),
    "blue": (30, 40, 200),
    "green": (30, 160, 40),
    "black": (15, 15, 15),
    "white": (235, 235, 235),
    "yellow": (220, 210, 40),
}


def person_crop(seed: int, size: tuple[int, int] = (48, 96), fmt: str = "JPEG") -> bytes:
    """A synthetic 'person' crop: head, coloured top and trousers on a noisy background."""
    rng = np.random.default_rng(seed)
    w, h = size
    bg = rng.integers(60, 200, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    names = list(COLOURS)
    top, legs = COLOURS[names[seed % 6]], COLOURS[names[(seed // 6) % 6]]
    draw.ellipse([w * 0.35, h * 0.02, w * 0.65, h * 0.18], fill=(210, 170, 140))
    draw.rectangle([w * 0.25, h * 0.18, w * 0.75, h * 0.55], fill=top)
    draw.rectangle([w * 0.3, h * 0.55, w * 0.7, h * 0.95], fill=legs)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gallery_items(n: int = 20, cameras: int = 3, seed0: int = 0) -> list[node_pb2.ImageItem]:
    return [
        node_pb2.ImageItem(
            data=person_crop(seed0 + i),
            camera_id=f"cam{i % cameras}",
            timestamp_ms=1_700_000_000_000 + 1000 * i,
            captions=[f"person {i}"],
            file_name=f"crop_{seed0 + i:03d}.jpg",
        )
        for i in range(n)
    ]


def make_config(tmp_path: Path, **overrides) -> NodeConfig:
    values = dict(
        node_id="node-a",
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        model="tiny",
        adapter_dir=tmp_path / "adapters",
        adapter_poll_s=0.2,
        drop_poll_s=0.2,
        drop_settle_s=0.0,
        grace_s=2.0,
        index=IndexSettings(embed_batch_size=8, save_interval_s=0.0),
        auth=AuthSettings(token=TOKEN),
    )
    values.update(overrides)
    return NodeConfig(**values)


@dataclass
class Served:
    stub: node_pb2_grpc.NodeServiceStub
    channel: grpc.Channel
    node: object
    port: int
    config: NodeConfig


@pytest.fixture
def serve_node(tmp_path: Path) -> Iterator:
    """Factory: start a real node server on 127.0.0.1:0; everything is stopped at teardown."""
    from edge_node.serving.daemon import create_server, shutdown

    started = []

    def start(**overrides) -> Served:
        config = make_config(tmp_path, **overrides)
        server, port, node = create_server(config)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, node, channel))
        return Served(node_pb2_grpc.NodeServiceStub(channel), channel, node, port, config)

    yield start
    for server, node, channel in started:
        channel.close()
        shutdown(server, node, 1.0)


def ingest(served: Served, items: list[node_pb2.ImageItem]) -> list[int]:
    response = served.stub.Ingest(node_pb2.IngestRequest(images=items), metadata=AUTH, timeout=30)
    assert all(r.accepted for r in response.results), [r.reason for r in response.results]
    assert served.node.wait_indexed(60)
    return [r.image_id for r in response.results]
