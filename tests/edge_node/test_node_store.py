"""Gallery catalog, drop folder and faiss index without a model: crash leftovers, filters,
index types, ties, persistence checked against the model version."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from node_fixtures import person_crop

from common.errors import InvalidQuery, NotFound
from edge_node.config import IndexSettings, Limits
from edge_node.serving.dropfolder import DropFolder
from edge_node.serving.gallery import Gallery, IngestItem
from edge_node.serving.indexer import INDEX_FILE, VectorIndex, normalise


def test_gallery_reopens_and_removes_crash_leftovers(tmp_path: Path):
    gallery = Gallery(tmp_path / "g", Limits())
    woken = []
    gallery.add_listener(woken.append)
    out = gallery.ingest([IngestItem(person_crop(i), f"cam{i % 2}", 1000 * i) for i in range(4)])
    assert [o.image_id for o in out] == [1, 2, 3, 4] and woken == [[1, 2, 3, 4]]
    gallery.close()
    # a crash after the file rename but before the commit leaves an unreferenced file
    orphan = tmp_path / "g" / "images" / "ab" / ("ab" * 32 + ".jpg")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(person_crop(99))
    (orphan.parent / ".x.jpg.123.tmp").write_bytes(b"half")
    reopened = Gallery(tmp_path / "g", Limits())
    assert len(reopened) == 4 and not orphan.exists() and not list(orphan.parent.iterdir())
    assert reopened.missing_files() == []
    assert reopened.get(3).camera_id == "cam0" and reopened.load_image(3).mode == "RGB"
    with pytest.raises(NotFound):
        reopened.get(5)
    new = reopened.ingest([IngestItem(person_crop(7), "cam1", 9)])
    assert new[0].image_id == 5  # ids are never reused
    reopened.close()


def test_gallery_filters(tmp_path: Path):
    gallery = Gallery(tmp_path / "g", Limits())
    gallery.ingest([IngestItem(person_crop(i), f"cam{i % 3}", 100 * i) for i in range(9)])
    assert gallery.select_ids() is None
    assert gallery.select_ids(["cam1"]).tolist() == [2, 5, 8]
    assert gallery.select_ids(since_ms=300, until_ms=500).tolist() == [4, 5, 6]
    assert gallery.select_ids(["cam0", "cam2"], until_ms=300).tolist() == [1, 3, 4]
    with pytest.raises(InvalidQuery, match="cam7"):
        gallery.select_ids(["cam7"])
    with pytest.raises(InvalidQuery, match="time range"):
        gallery.select_ids(since_ms=5, until_ms=1)
    gallery.close()


def test_drop_folder_ingests_settled_files_and_rejects_bad_ones(tmp_path: Path):
    gallery = Gallery(tmp_path / "g", Limits(max_image_bytes=100_000))
    drop = tmp_path / "drop"
    (drop / "gate-3").mkdir(parents=True)
    (drop / "gate-3" / "p1.jpg").write_bytes(person_crop(1))
    (drop / "gate-3" / "p1.txt").write_text("a man in red\n\nblue jeans\n")
    (drop / "gate-3" / "bad.jpg").write_bytes(b"not a jpeg")
    (drop / "gate-3" / "big.jpg").write_bytes(b"\0" * 100_001)
    (drop / "gate-3" / "writing.jpg.part").write_bytes(b"\xff\xd8")
    (drop / "loose.jpg").write_bytes(person_crop(2))
    fresh = drop / "gate-3" / "fresh.jpg"
    fresh.write_bytes(person_crop(3))
    old = time.time() - 10
    for path in drop.rglob("*"):
        if path.is_file() and path != fresh:
            os.utime(path, (old, old))

    accepted, rejected = DropFolder(drop, gallery, settle_s=5.0).scan_once()
    assert (accepted, rejected) == (1, 3)
    rec = gallery.get(1)
    assert (rec.camera_id, rec.file_name, rec.captions) == (
        "gate-3",
        "p1.jpg",
        ("a man in red", "blue jeans"),
    )
    assert rec.timestamp_ms == int(old * 1000)
    assert (drop / ".processed" / "gate-3" / "p1.jpg").exists()
    assert "not an image" in (drop / ".rejected" / "gate-3" / "bad.jpg.reason.txt").read_text()
    assert "max-image-bytes" in (drop / ".rejected" / "gate-3" / "big.jpg.reason.txt").read_text()
    assert (drop / ".rejected" / "_no_camera" / "loose.jpg").exists()
    assert fresh.exists() and (drop / "gate-3" / "writing.jpg.part").exists()  # not read yet
    assert gallery.rejected_count == 3 and len(gallery) == 1
    gallery.close()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_types_find_the_nearest_and_respect_filters(kind: str):
    rng = np.random.default_rng(0)
    vectors = normalise(rng.standard_normal((400, 16)))
    ids = np.arange(1000, 1400)
    index = VectorIndex(16, IndexSettings(type=kind, ivf_nlist=4, ivf_nprobe=4), "v1")
    index.add(ids[:100], vectors[:100])
    index.add(ids, vectors)  # overlapping ids are skipped, not duplicated
    assert len(index) == 400
    if kind == "ivf":
        assert index.kind == "ivf"  # trained once 39 x nlist vectors arrived
    scores, found, searched = index.search(vectors[7], 5)
    assert found[0] == 1007 and scores[0] == pytest.approx(1.0, abs=1e-5) and searched == 400
    exact = np.argsort(-(vectors @ vectors[7]))[:5] + 1000
    assert set(found.tolist()) == set(exact.tolist())
    allowed = np.array([1003, 1200, 1399, 5000])
    scores, found, searched = index.search(vectors[7], 10, allowed)
    assert set(found.tolist()) == {1003, 1200, 1399} and searched == 3


def test_equal_scores_are_ordered_by_id():
    index = VectorIndex(4, IndexSettings(), "v1")
    same = np.tile(normalise(np.ones((1, 4))), (12, 1))
    index.add(np.arange(30, 18, -1), same)  # inserted in descending id order
    _, found, _ = index.search(np.ones(4), 5)
    assert found.tolist() == [19, 20, 21, 22, 23]


def test_saved_index_is_reused_only_for_its_version_and_when_intact(tmp_path: Path):
    rng = np.random.default_rng(1)
    index = VectorIndex(8, IndexSettings(), "model@v1")
    index.add(np.arange(1, 21), rng.standard_normal((20, 8)))
    index.save(tmp_path, extra={"adapter": ""})
    loaded = VectorIndex.load(tmp_path, IndexSettings(), "model@v1", 8)
    assert loaded is not None and loaded.id_array().tolist() == list(range(1, 21))
    assert VectorIndex.load(tmp_path, IndexSettings(), "model@v2", 8) is None
    assert VectorIndex.load(tmp_path, IndexSettings(type="hnsw"), "model@v1", 8) is None
    blob = (tmp_path / INDEX_FILE).read_bytes()
    (tmp_path / INDEX_FILE).write_bytes(blob[:-8])  # a save interrupted between the two files
    assert VectorIndex.load(tmp_path, IndexSettings(), "model@v1", 8) is None
