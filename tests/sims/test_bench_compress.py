"""`fedretrieve bench compress` (issue 15): the JSON contract on tiny models, the mixed merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sims.bench.compress import mixed_fleet_r1
from sims.cli import main as fedretrieve

ROW_KEYS = {
    "name", "kind", "precision", "params", "file_mb", "crops_per_s_b1", "crops_per_s_b8",
    "R1", "mAP", "rss_mb", "rss_mb_vector_only",
}  # fmt: skip


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _fleet(seed: int):
    rng = np.random.default_rng(seed)
    gallery = _unit(rng.normal(size=(40, 8)))
    nodes = np.array([f"n{i % 4}" for i in range(40)])
    queries = _unit(gallery + 0.05 * rng.normal(size=gallery.shape))
    return queries, np.arange(40), gallery, np.arange(40), nodes


MIXED = {"n0": "teacher", "n1": "teacher", "n2": "student", "n3": "student"}


def test_a_student_in_the_teachers_space_merges_by_score_like_an_all_teacher_fleet():
    queries, q_ids, gallery, g_ids, nodes = _fleet(0)
    emb = {"teacher": gallery, "student": gallery.copy()}
    mixed = mixed_fleet_r1(queries, q_ids, g_ids, nodes, emb, MIXED)
    alone = mixed_fleet_r1(queries, q_ids, g_ids, nodes, emb, dict.fromkeys(MIXED, "teacher"))
    assert mixed["score"] == alone["score"] == 100.0
    # rank fusion of one list per version cannot order two first places: ties go by
    # node id, so the student half's true matches lose
    assert mixed["rrf"] <= 60.0


def test_an_uncalibrated_student_takes_the_top_of_a_score_merge():
    queries, q_ids, gallery, g_ids, nodes = _fleet(1)
    emb = {"teacher": gallery, "student": _unit(gallery + 3.0)}  # inflated scores
    assert mixed_fleet_r1(queries, q_ids, g_ids, nodes, emb, MIXED)["score"] <= 60.0


def test_bench_compress_writes_the_contract(tiny_dataset: Path, tmp_path: Path):
    spec = json.loads(Path("common/model_configs/tiny.json").read_text())
    spec["image"] = {"type": "cnn", "widths": [8, 8], "depths": [1, 1], "groups": 4}
    (tmp_path / "student.json").write_text(json.dumps(spec))
    student = tmp_path / "student"
    pruned = tmp_path / "pruned"
    common = ["--data", str(tiny_dataset), "--epochs", "1", "--batch-size", "8", "--eval-split", ""]
    distill = ["distill", "--student", str(tmp_path / "student.json"), "--out", str(student)]
    assert fedretrieve([*distill, "--teacher", "tiny", *common]) == 0
    prune = ["prune", "--keep", "0.5", "--out", str(pruned)]
    assert fedretrieve([*prune, "--teacher", "tiny", *common]) == 0
    out = tmp_path / "compress.json"
    rc = fedretrieve(
        ["bench", "compress", "--json", str(out), "--teacher", "tiny", "--data", str(tiny_dataset),
         "--students", str(student), "--pruned", str(pruned), "--skip-rss",
         "--work", str(tmp_path / "work"), "--calib-images", "8", "--timed-s", "0.1"]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["kind"], r["precision"]) for r in rows] == [
        (kind, p) for kind in ("teacher", "student", "pruned") for p in ("fp32", "int8")
    ]
    for row in rows:
        assert set(row) >= ROW_KEYS, row
        assert row["crops_per_s_b1"] > 0 and row["file_mb"] > 0 and 0 <= row["R1"] <= 100
    assert rows[2]["params"] < rows[0]["params"]
    fleet = result["mixed_fleet"]
    assert {"R1_mixed", "R1_all_teacher", "merge"} <= set(fleet)


def test_node_rss_comes_from_real_daemons_and_a_vector_only_node_is_lighter(tmp_path: Path):
    from common.factory import create_model
    from edge_node.accel.export import export_model
    from sims.bench.compress_rss import node_rss

    export = tmp_path / "export" / "onnx-fp32"
    export_model(create_model("tiny"), export, model_spec="tiny")
    rss = node_rss(export, tmp_path / "work", 40)
    # the vector-only node imports neither torch nor transformers: hundreds of MB less
    assert 0 < rss["rss_mb_vector_only"] < rss["rss_mb"] - 100, rss
