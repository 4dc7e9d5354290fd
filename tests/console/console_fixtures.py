"""The console's test world, all real and all on loopback: node daemons with real galleries
(tiny model), a real broker in front of them, the console on uvicorn, and Debian's headless
Chromium driven by Playwright.

One person ("the red-and-black walker", one crop) is seen by four cameras on two nodes a
minute apart, so find-similar and sightings have something definite to find; the other
crops are different outfits, some of them three hours old (for the time filters).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw

from protos import node_pb2, node_pb2_grpc

NODE_TOKEN = "console-node-token"
TOKENS = {"alice": "alice-broker-token-0123456789", "bob": "bob-broker-token-9876543210"}
ADMINS = ("alice",)
NOW_MS = int(time.time() * 1000)
WALKER_T0 = NOW_MS - 40 * 60 * 1000  # the walker's first sighting: 40 minutes ago
WALKER_CAMERAS = [("north", "north-cam0"), ("north", "north-cam1"), ("south", "south-cam0"),
                  ("south", "south-cam1")]  # fmt: skip
OLD_MS = NOW_MS - 3 * 3600 * 1000  # outside "last 2 hours"
COLOURS = [(200, 30, 30), (30, 40, 200), (30, 160, 40), (15, 15, 15), (235, 235, 235),
           (220, 210, 40)]  # fmt: skip
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Screenshots land in docs/console only when asked (`FEDRETRIEVE_SCREENSHOTS=docs/console
# make test`): a test run must not rewrite tracked files. Otherwise a temporary folder.
SCREENSHOTS = Path(
    os.environ.get("FEDRETRIEVE_SCREENSHOTS") or tempfile.mkdtemp(prefix="console-shots-")
)


def crop(seed: int, top: int | None = None, legs: int | None = None) -> bytes:
    """A small synthetic person crop (PNG: lossless, so equal seeds embed equally)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(60, 200, size=(96, 48, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([17, 2, 31, 17], fill=(210, 170, 140))
    draw.rectangle([12, 18, 36, 52], fill=COLOURS[seed % 6 if top is None else top])
    draw.rectangle([15, 52, 33, 92], fill=COLOURS[(seed // 6) % 6 if legs is None else legs])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def walker(camera_index: int) -> bytes:
    """The walker as one camera saw them: the same crop with one corner pixel changed (a
    node keeps one copy of identical bytes; these embed almost identically)."""
    img = Image.open(io.BytesIO(crop(999, top=0, legs=3))).convert("RGB")  # red top, black legs
    img.putpixel((0, 0), (camera_index * 40, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def gallery(node_id: str) -> list[node_pb2.ImageItem]:
    """Eight crops per node: the walker on each of its two cameras, six others."""
    items = []
    for i, (owner, camera) in enumerate(WALKER_CAMERAS):
        if owner == node_id:
            items.append(
                node_pb2.ImageItem(
                    data=walker(i),
                    camera_id=camera,
                    timestamp_ms=WALKER_T0 + i * 60_000,
                    file_name=f"walker-{camera}.png",
                )
            )
    base = 0 if node_id == "north" else 100
    for j in range(6):
        items.append(
            node_pb2.ImageItem(
                data=crop(base + j),
                camera_id=f"{node_id}-cam{j % 2}",
                timestamp_ms=(OLD_MS if j >= 4 else NOW_MS - (10 + j) * 60_000),
                file_name=f"{node_id}-{j}.png",
            )
        )
    return items


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_address() -> str:
    """A loopback address where nothing listens (a node that is down)."""
    return f"127.0.0.1:{free_port()}"


@dataclass
class Fleet:
    nodes: dict[str, str]  # node id -> address
    image_ids: dict[str, list[int]]  # node id -> ingested ids, in gallery() order
    servers: list = field(default_factory=list)

    def walker_ids(self) -> set[tuple[str, int]]:
        out = set()
        for node_id, ids in self.image_ids.items():
            n = sum(1 for owner, _ in WALKER_CAMERAS if owner == node_id)
            out.update((node_id, i) for i in ids[:n])
        return out


def start_fleet(root: Path) -> Fleet:
    from edge_node.config import AuthSettings, IndexSettings, NodeConfig
    from edge_node.serving.daemon import create_server

    fleet = Fleet({}, {})
    for node_id in ("north", "south"):
        config = NodeConfig(
            node_id=node_id,
            data_dir=root / node_id,
            listen="127.0.0.1:0",
            model="tiny",
            adapter_dir=root / f"{node_id}-adapters",
            index=IndexSettings(embed_batch_size=8, save_interval_s=0.0),
            auth=AuthSettings(token=NODE_TOKEN),
            grace_s=1.0,
        )
        server, port, node = create_server(config)
        server.start()
        fleet.servers.append((server, node))
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            reply = node_pb2_grpc.NodeServiceStub(channel).Ingest(
                node_pb2.IngestRequest(images=gallery(node_id)),
                metadata=[("authorization", f"Bearer {NODE_TOKEN}")],
                timeout=60,
            )
        assert all(r.accepted for r in reply.results), [r.reason for r in reply.results]
        assert node.wait_indexed(60), f"{node_id} did not index its gallery within 60 s"
        fleet.nodes[node_id] = address
        fleet.image_ids[node_id] = [r.image_id for r in reply.results]
    return fleet


def stop_fleet(fleet: Fleet) -> None:
    from edge_node.serving.daemon import shutdown

    for server, node in fleet.servers:
        shutdown(server, node, 1.0)


def broker_config(nodes: dict[str, str], port: int = 0):
    from server.broker.config import BrokerConfig, NodeEntry

    return BrokerConfig(
        nodes=tuple(NodeEntry(id=i, address=a, token=NODE_TOKEN) for i, a in nodes.items()),
        listen=f"127.0.0.1:{port}",
        operator_tokens=tuple(TOKENS.values()),
        default_deadline_ms=5000,
        merge_margin_ms=20,
        health_interval_s=60.0,
        retry_max_attempts=2,
    )


@dataclass
class BrokerRun:
    server: object
    broker: object
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        from server.broker.daemon import stop_server

        stop_server(self.server, self.broker, grace=None)


def start_broker(nodes: dict[str, str], encoder, port: int = 0) -> BrokerRun:
    from server.broker.daemon import create_server

    server, bound, broker = create_server(
        broker_config(nodes, port), encoder=encoder, health_checks=False
    )
    broker.registry.check_all()  # learn each node's cameras and gallery size now
    return BrokerRun(server, broker, bound)


def write_console_config(folder: Path, broker: str, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, token in TOKENS.items():
        (folder / f"{name}.token").write_text(token + "\n")
    lines = [
        f'broker = "{broker}"',
        'listen = "127.0.0.1:0"',
        f"admins = {list(ADMINS)!r}".replace("'", '"'),
        'audit-log = "audit.jsonl"',
        'session-secret-file = "session.secret"',
        "connect-timeout-s = 1.0",
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    lines.append("[operators]")
    lines += [f'{name} = "{name}.token"' for name in TOKENS]
    path = folder / "console.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_console(config_path: Path):
    from server.console.config import load_console_config
    from server.console.server import start_in_thread

    return start_in_thread(load_console_config(config_path))


# ---------------------------------------------------------------- the browser


def chromium_path() -> str:
    """Debian's chromium, or FEDRETRIEVE_CHROMIUM / CHROMIUM; a missing one fails the test."""
    path = (
        os.environ.get("FEDRETRIEVE_CHROMIUM") or os.environ.get("CHROMIUM") or "/usr/bin/chromium"
    )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        found = shutil.which("chromium")
        if found:
            return found
        pytest.fail(
            f"no Chromium at {path}: the console's browser tests need Debian's chromium "
            "(`make browser`, or `apt-get install chromium`, or set FEDRETRIEVE_CHROMIUM)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """One headless Chromium per test module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: `pip install -e .[dev]` (or `make setup`)",
            pytrace=False,
        )
    executable = chromium_path()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def sign_in(page, url: str, operator: str = "alice") -> None:
    page.goto(f"{url}/login")
    page.get_by_label("Operator token").fill(TOKENS[operator])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/search")


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
