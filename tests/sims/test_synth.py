"""The synthetic benchmark: determinism, splits, node/camera partition, readers, preview."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.datasets import load_records
from common.errors import ConfigError, DatasetError
from sims.synth import SynthConfig, generate, make_preview
from sims.synth.attributes import node_weights, sample_identity
from sims.synth.generate import camera_nodes

SMALL = dict(
    identities=10,
    source_identities=4,
    cameras=4,
    nodes=2,
    images_per_camera=1,
    source_cameras=2,
    size=(64, 32),
    cameras_per_identity=(2, 3),
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(**SMALL), out, workers=1)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _annotations(root: Path) -> list[dict]:
    return json.loads((root / "annotations.json").read_text())


@pytest.mark.slow
def test_same_seed_gives_same_bytes_whatever_the_worker_count(bench, tmp_path):
    generate(SynthConfig(**SMALL), tmp_path / "again", workers=2)
    first, second = _files(bench), _files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert len([f for f in first if f.endswith(".jpg")]) == len(_annotations(bench))
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []


def test_another_seed_gives_other_images(bench, tmp_path):
    generate(SynthConfig(**{**SMALL, "seed": 1}), tmp_path / "other", workers=1)
    a, b = _files(bench), _files(tmp_path / "other")
    jpgs = [f for f in a if f.endswith(".jpg") and f in b]
    assert sum(a[f] != b[f] for f in jpgs) > len(jpgs) // 2


def test_splits_are_disjoint_by_person_id(bench):
    ids = defaultdict(set)
    for r in _annotations(bench):
        ids[r["split"]].add(r["id"])
    assert set(ids) == {"train", "test", "source"}
    assert not ids["train"] & ids["test"]
    assert not ids["source"] & (ids["train"] | ids["test"])
    assert len(ids["train"] | ids["test"]) == SMALL["identities"]
    assert len(ids["test"]) == round(SMALL["identities"] * 0.4)
    assert len(ids["source"]) == SMALL["source_identities"]


def test_cameras_are_partitioned_over_nodes_and_identities_cross_nodes(bench):
    records = _annotations(bench)
    node_of = camera_nodes(SynthConfig(**SMALL))
    assert sorted(set(node_of.values())) == ["node1", "node2"]
    assert Counter(node_of.values()) == {"node1": 2, "node2": 2}
    for r in records:
        if r["split"] == "source":
            assert r["node"] is None and r["camera"].startswith("s")
        else:
            assert r["node"] == node_of[r["camera"]]
    cams, nodes = defaultdict(set), defaultdict(set)
    for r in records:
        if r["split"] != "source":
            cams[r["id"]].add(r["camera"])
            nodes[r["id"]].add(r["node"])
    lo, hi = SMALL["cameras_per_identity"]
    assert all(lo <= len(c) <= hi for c in cams.values())
    source_cams = defaultdict(list)
    for r in records:
        if r["split"] == "source":
            source_cams[r["id"]].append(r["camera"])
    assert all(len(c) == len(set(c)) == 2 for c in source_cams.values())  # source_images=2
    assert any(len(n) > 1 for n in nodes.values())


def test_summary_counts_match_the_annotations(bench):
    records = _annotations(bench)
    summary = json.loads((bench / "summary.json").read_text())
    assert summary["images"] == len(records)
    assert summary["images_per_split"] == dict(Counter(r["split"] for r in records))
    assert sum(n["images"] for n in summary["nodes"].values()) == sum(
        r["split"] != "source" for r in records
    )
    captions = [c for r in records for c in r["captions"]]
    assert summary["captions"] == {"total": len(captions), "distinct": len(set(captions))}
    assert all(len(r["captions"]) == 2 for r in records)


def test_images_have_the_requested_size(bench):
    first = _annotations(bench)[0]
    with Image.open(bench / first["file_path"]) as img:
        assert img.size == (32, 64) and img.format == "JPEG"


def test_foundation_reader_loads_the_output_unchanged(bench):
    records = _annotations(bench)
    loaded = load_records(bench)
    assert len(loaded) == len(records)
    for raw, rec in zip(records, loaded, strict=True):
        assert rec.image_path == bench / raw["file_path"]
        assert rec.captions == tuple(raw["captions"])
        assert (rec.person_id, rec.split, rec.camera_id, rec.node, rec.timestamp_ms) == (
            raw["id"],
            raw["split"],
            raw["camera"],
            raw["node"],
            raw["timestamp_ms"],
        )
    assert {r.split for r in load_records(bench, split="source")} == {"source"}


def test_preview_renders_a_sheet_with_every_camera(bench, tmp_path):
    out = make_preview(bench, tmp_path / "sheet.png", per_camera=2)
    with Image.open(out) as sheet:
        assert sheet.height >= 6 * 128  # 4 target + 2 source cameras, a row each
        pixels = np.asarray(sheet.convert("L"))
    assert pixels.std() > 20  # crops and text, not a blank page


def test_preview_without_annotations_is_a_clean_error(tmp_path):
    with pytest.raises(DatasetError, match="fedretrieve synth"):
        make_preview(tmp_path, tmp_path / "x.png")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("nodes", 5),
        ("identities", 1),
        ("shift", "extreme"),
        ("size", (8, 8)),
        ("test_fraction", 1.0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SynthConfig(**{**SMALL, field: value})


def test_node_priors_make_nodes_non_iid():
    def freq(node, attr, value, n=400):
        rng = np.random.default_rng(node)
        w = node_weights(node)
        return sum(getattr(sample_identity(i, rng, w), attr) == value for i in range(n)) / n

    assert freq(0, "upper", "coat") > 2 * freq(1, "upper", "coat")  # cold street vs park
    assert freq(1, "lower", "shorts") > 2 * freq(0, "lower", "shorts")
    assert freq(3, "bag", "backpack") > 1.5 * freq(2, "bag", "backpack")


def test_cli_writes_benchmark_and_preview(tmp_path, capsys):
    from sims.cli import main

    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--identities", "4", "--source-identities", "2",
            "--cameras", "2", "--nodes", "2", "--images-per-camera", "1", "--size", "64x32",
            "--workers", "1", "--preview", str(tmp_path / "p.png")]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "p.png").is_file()
    assert "images" in capsys.readouterr().out
    bad = ["synth", "--out", str(tmp_path / "bad"), "--nodes", "3", "--cameras", "2"]
    assert main(bad) == 2  # a clean ConfigError, not a traceback
    assert "nodes" in capsys.readouterr().err
