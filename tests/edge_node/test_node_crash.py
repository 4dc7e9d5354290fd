"""The daemon as operators run it (`fedretrieve node serve`), killed with SIGKILL during
ingest and restarted: no catalog row without its image, no acknowledged image lost, and an
index consistent with the catalog. Also: SIGTERM shuts down cleanly and persists the index."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from node_fixtures import AUTH, TOKEN, gallery_items

from edge_node.config import IndexSettings
from edge_node.serving.indexer import VectorIndex
from protos import node_pb2, node_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f"""
node-id = "crash-node"
data-dir = "data"
listen = "127.0.0.1:0"
model = "tiny"
torch-threads = 1
grace-s = 5.0
[index]
embed-batch-size = 4
save-interval-s = 0.5
[auth]
token = "{TOKEN}"
"""
    )
    return path


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sims.cli", "node", "serve", "--config", str(config)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.log,
        )  # fmt: skip
        line = self.proc.stdout.readline().decode()  # "READY host:port" once serving
        assert line.startswith("READY "), f"daemon did not start: {line!r}; see {log}"
        self.target = line.split()[1]
        self.channel = grpc.insecure_channel(self.target)
        self.stub = node_pb2_grpc.NodeServiceStub(self.channel)

    def status(self) -> node_pb2.StatusResponse:
        return self.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10)

    def wait_indexed(self, timeout: float = 60) -> node_pb2.StatusResponse:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status.indexed_size == status.gallery_size:
                return status
            time.sleep(0.1)
        raise AssertionError(f"index never caught up: {status}")

    def stop(self, sig: int) -> int:
        self.channel.close()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        self.log.close()
        return rc


def catalog_rows(data: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(data / "gallery" / "catalog.sqlite") as db:
        return db.execute("SELECT id, path, checksum FROM images ORDER BY id").fetchall()


@pytest.mark.slow
def test_sigkill_during_ingest_loses_nothing_acknowledged(tmp_path: Path):
    config = write_config(tmp_path)
    data = tmp_path / "data"
    daemon = Daemon(config, tmp_path / "daemon.log")
    items = gallery_items(60, cameras=4)
    acked: dict[int, str] = {}  # image id -> sha256 of the bytes the node acknowledged
    refused: list[str] = []  # reasons of images the node refused (must stay empty)
    done = threading.Event()

    def ingest_loop() -> None:
        try:
            for start in range(0, len(items), 3):
                batch = items[start : start + 3]
                try:
                    reply = daemon.stub.Ingest(
                        node_pb2.IngestRequest(images=batch), metadata=AUTH, timeout=10
                    )
                except grpc.RpcError:
                    break  # the daemon died mid-call: this batch was never acknowledged
                for item, result in zip(batch, reply.results, strict=True):
                    if not result.accepted:
                        refused.append(result.reason)
                        return
                    acked[result.image_id] = hashlib.sha256(item.data).hexdigest()
        finally:
            done.set()  # whatever happened, the main thread stops waiting

    thread = threading.Thread(target=ingest_loop)
    thread.start()
    deadline = time.monotonic() + 120
    while len(acked) < 24 and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.005)
    daemon.stop(signal.SIGKILL)  # no chance to flush anything
    thread.join(timeout=30)
    assert not thread.is_alive(), "the ingest thread did not end after the kill"
    assert not refused, f"the node refused an image: {refused[0]}"
    assert 24 <= len(acked) < len(items), "the kill must land in the middle of the ingest"

    # invariants on disk right after the crash, before any recovery code runs
    rows = catalog_rows(data)
    assert all((data / "gallery" / path).is_file() for _, path, _ in rows)
    by_id = {image_id: checksum for image_id, _, checksum in rows}
    assert all(by_id.get(i) == c for i, c in acked.items()), "an acknowledged image was lost"

    restarted = Daemon(config, tmp_path / "daemon.log")
    status = restarted.wait_indexed()
    assert status.gallery_size == len(rows) >= len(acked)
    for image_id in acked:  # every acknowledged image is readable through the service
        thumb = restarted.stub.GetThumbnail(
            node_pb2.ThumbnailRequest(image_id=image_id), metadata=AUTH
        )
        assert thumb.jpeg
    # the rest of the gallery can be sent again: already stored images come back as duplicates
    reply = restarted.stub.Ingest(node_pb2.IngestRequest(images=items[:30]), metadata=AUTH)
    assert all(r.accepted for r in reply.results)
    reply = restarted.stub.Ingest(node_pb2.IngestRequest(images=items[30:]), metadata=AUTH)
    assert all(r.accepted for r in reply.results)
    status = restarted.wait_indexed()
    assert status.gallery_size == 60
    hits = restarted.stub.Search(
        node_pb2.SearchRequest(text="a person", k=100, query_id="q-after-crash"), metadata=AUTH
    )
    assert hits.vectors_searched == 60 and len({h.image_id for h in hits.hits}) == 60
    assert restarted.stop(signal.SIGTERM) == 0  # graceful: in-flight calls done, index saved

    rows = catalog_rows(data)
    assert len(rows) == 60
    for _, path, checksum in rows:
        assert hashlib.sha256((data / "gallery" / path).read_bytes()).hexdigest() == checksum
    stored = {p for p in (data / "gallery" / "images").rglob("*") if p.is_file()}
    assert stored == {data / "gallery" / path for _, path, _ in rows}, "orphan or missing files"
    index = VectorIndex.load(
        data / "index", IndexSettings(), status.model_version, status.embed_dim
    )
    assert index is not None, "the index saved at SIGTERM must load for the same model version"
    assert sorted(index.id_array().tolist()) == [image_id for image_id, _, _ in rows]
    log = (tmp_path / "daemon.log").read_text()
    assert "stopped cleanly" in log
    assert "query_id=q-after-crash: search k=100 hits=60" in log  # structured, with the query id
