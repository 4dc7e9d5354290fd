"""`fedretrieve ingest` against a real node daemon on loopback (tiny model, token auth)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from console_fixtures import closed_port_address, crop

from edge_node.ingest_cli import batches
from protos import node_pb2, node_pb2_grpc
from sims.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TOKEN = "ingest-node-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from edge_node.config import AuthSettings, IndexSettings, NodeConfig
    from edge_node.serving.daemon import create_server, shutdown

    root = tmp_path_factory.mktemp("ingest-node")
    config = NodeConfig(
        node_id="gate",
        data_dir=root / "data",
        listen="127.0.0.1:0",
        model="tiny",
        adapter_dir=root / "adapters",
        index=IndexSettings(embed_batch_size=8, save_interval_s=0.0),
        auth=AuthSettings(token=TOKEN),
        grace_s=1.0,
    )
    server, port, running = create_server(config)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield f"127.0.0.1:{port}", node_pb2_grpc.NodeServiceStub(channel), running
    channel.close()
    shutdown(server, running, 1.0)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three crops, one broken "jpg", a text file, and one crop in a sub-folder."""
    images = tmp_path / "crops"
    (images / "later").mkdir(parents=True)
    for i in range(3):
        path = images / f"person-{i}.png"
        path.write_bytes(crop(500 + i))
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (images / "notes.txt").write_text("not an image")
    (images / "later" / "person-9.png").write_bytes(crop(509))
    (tmp_path / "token").write_text(TOKEN + "\n")
    return images


def ingest(folder: Path, address: str, *extra: str) -> int:
    token = str(folder.parent / "token")
    return main(["ingest", "--node", address, "--camera", "gate-cam", "--token-file", token,
                 *extra, str(folder)])  # fmt: skip


def test_ingest_sends_the_folder_and_reports_each_rejection(node, folder, capsys):
    address, stub, running = node
    assert ingest(folder, address, "--batch-size", "2") == 1  # one image rejected
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == (
        f"node {address}, camera gate-cam: 3 accepted, 1 rejected; "
        "1 files that are not images left out"
    )
    assert lines[1].startswith("  rejected broken.jpg: ") and len(lines) == 2
    assert "ingest" not in out.err  # no progress bar when stderr is not a terminal
    assert running.wait_indexed(60)
    status = stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10)
    assert status.gallery_size == 3 and list(status.camera_ids) == ["gate-cam"]
    thumb = stub.GetThumbnail(node_pb2.ThumbnailRequest(image_id=1), metadata=AUTH, timeout=10)
    assert thumb.file_name == "person-0.png" and thumb.timestamp_ms == 1_700_000_000_000

    assert ingest(folder, address, "--recursive") == 1
    again = capsys.readouterr().out.splitlines()[0]
    assert "1 accepted, 1 rejected, 3 already in the gallery" in again
    status = stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10)
    assert status.gallery_size == 4


def test_ingest_mistakes_are_one_line(node, folder, tmp_path, capsys):
    address, _, _ = node
    (folder.parent / "token").write_text("wrong-token")
    assert ingest(folder, address) == 2
    err = capsys.readouterr().err
    assert "refused the token" in err and "Traceback" not in err and err.count("\n") == 1

    assert ingest(folder, closed_port_address(), "--connect-timeout", "0.5") == 2
    assert "cannot reach the node" in capsys.readouterr().err

    assert ingest(tmp_path / "nowhere", address) == 2
    assert "no such folder" in capsys.readouterr().err

    assert ingest(folder, address, "--batch-size", "0") == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_batches_split_by_count_and_by_bytes(tmp_path):
    paths = []
    for i, size in enumerate([10, 10, 10, 50, 10]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"x" * size)
        paths.append(path)
    by_count = [[p.name for p in b] for b in batches(paths, 2, max_bytes=1000)]
    assert by_count == [["0.png", "1.png"], ["2.png", "3.png"], ["4.png"]]
    by_bytes = [[p.name for p in b] for b in batches(paths, 10, max_bytes=40)]
    assert by_bytes == [["0.png", "1.png", "2.png"], ["3.png"], ["4.png"]]  # a big one alone
