"""A node trains on its own gallery (issue 14, part 1): the daemon's catalog + files are the
Flower ClientApp's data store, read while the daemon ingests."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from PIL import Image

from common.errors import DatasetError, NotFound
from edge_node.config import Limits
from edge_node.fl.client_app import build_client_app
from edge_node.fl.task import NodeFlSettings, load_node_data
from edge_node.serving.gallery import Gallery, IngestItem, read_catalog

# the ClientApp plumbing of the payload tests: one way to build a round's message
from tests.integration.test_flower_payload import _context, _message, _setup, sent_config


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _ingest(gallery: Gallery, start: int, n: int, captioned: bool) -> None:
    items = [
        IngestItem(
            _jpeg(i),
            f"cam{i % 2}",
            1_700_000_000_000 + i,
            (f"a person in outfit {i % 5}",) if captioned else (),
        )
        for i in range(start, start + n)
    ]
    assert all(o.accepted for o in gallery.ingest(items))


def test_the_client_app_trains_on_the_captioned_crops_of_a_node_gallery(tmp_path: Path):
    data_dir = tmp_path / "node-data"
    gallery = Gallery(data_dir / "gallery", Limits())
    _ingest(gallery, 0, 12, captioned=True)
    _ingest(gallery, 100, 5, captioned=False)
    settings = NodeFlSettings.from_configs({"gallery": str(data_dir), "node-id": "gate-3"}, {})
    data = load_node_data(settings)
    assert len(data.train) == 12 and data.heldout == []
    assert all(r.captions and r.image_path.is_file() and r.node == "gate-3" for r in data.train)
    assert len({r.person_id for r in data.train}) == 12  # no identities: one per crop

    _, cfg, _, _, initial, digest = _setup(data_dir, tmp_path, "fedavg")
    config = sent_config(cfg, digest)
    config["server-round"] = 1
    msg = _message(RecordDict({"arrays": initial, "config": config}), "train")
    reply = build_client_app()(msg, _context({"gallery": str(data_dir), "node-id": "gate-3"}))
    assert not reply.has_error(), reply.error
    metrics = next(iter(reply.content.metric_records.values()))
    assert metrics["num-examples"] == 12  # one caption per captioned crop
    gallery.close()


def test_a_gallery_without_captions_is_refused_by_name(tmp_path: Path):
    gallery = Gallery(tmp_path / "d" / "gallery", Limits())
    _ingest(gallery, 0, 4, captioned=False)
    settings = NodeFlSettings.from_configs({"gallery": str(tmp_path / "d"), "node-id": "n"}, {})
    with pytest.raises(DatasetError, match="4 crops but none with captions; set label-free"):
        load_node_data(settings)
    gallery.close()


def test_a_label_free_node_trains_on_every_uncaptioned_crop_of_its_gallery(tmp_path: Path):
    data_dir = tmp_path / "node-data"
    gallery = Gallery(data_dir / "gallery", Limits())
    _ingest(gallery, 0, 10, captioned=False)  # 1 ms apart on 2 cameras: tracklets by time
    _ingest(gallery, 100, 2, captioned=True)  # captions there are ignored, not required
    node_config = {"gallery": str(data_dir), "node-id": "gate-3", "label-free": "true"}
    data = load_node_data(NodeFlSettings.from_configs(node_config, {}))
    assert len(data.train) == 12

    _, cfg, _, _, initial, digest = _setup(data_dir, tmp_path, "fedavg")
    config = sent_config(cfg, digest)
    config["server-round"] = 1
    msg = _message(RecordDict({"arrays": initial, "config": config}), "train")
    reply = build_client_app()(msg, _context(node_config))
    assert not reply.has_error(), reply.error
    metrics = next(iter(reply.content.metric_records.values()))
    assert metrics["num-examples"] == 12
    # two cameras, every crop within 2 s of the last: at most one tracklet per camera
    # (more only where the appearance gate splits one)
    assert 2 <= metrics["pl-tracklets"] <= 12 and metrics["pl-ids"] <= metrics["pl-tracklets"]
    assert "pl-precision" not in metrics  # a site has no ground truth
    gallery.close()


def test_a_missing_gallery_says_where_it_looked(tmp_path: Path):
    settings = NodeFlSettings.from_configs({"gallery": str(tmp_path / "nowhere")}, {})
    with pytest.raises(NotFound, match="no gallery at"):
        load_node_data(settings)


def test_reading_while_the_daemon_ingests_neither_blocks_nor_sees_half_an_image(tmp_path: Path):
    gallery = Gallery(tmp_path / "gallery", Limits())
    batches, per_batch, seen, errors = 30, 4, [], []

    def writer() -> None:
        try:
            for b in range(batches):  # bounded
                t0 = time.perf_counter()
                _ingest(gallery, b * per_batch, per_batch, captioned=True)
                if time.perf_counter() - t0 > 5.0:
                    errors.append(f"batch {b} took {time.perf_counter() - t0:.1f} s")
                time.sleep(0.01)  # the reader gets to read between batches
        except Exception as err:  # surfaced below
            errors.append(repr(err))

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        rows = read_catalog(tmp_path / "gallery")
        assert all((tmp_path / "gallery" / r.path).is_file() for r in rows)  # row => file
        seen.append(len(rows))
    thread.join(timeout=60)
    assert not errors, errors
    assert seen == sorted(seen)  # snapshots only grow
    assert any(0 < n < batches * per_batch for n in seen)  # it did read mid-ingest
    assert len(read_catalog(tmp_path / "gallery")) == batches * per_batch == len(gallery)
    gallery.close()
