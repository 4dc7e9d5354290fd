"""The simulation's student nodes (issue 15): distilled on the server, refined on a node,
served by a real vector-only daemon beside a teacher node, checked by a real broker."""

from __future__ import annotations

import json
from pathlib import Path

from common.datasets import load_records
from common.evaluate import embed_records
from common.factory import create_model
from sims.simulation.pipeline import by_node
from sims.simulation.serving import ServingSettings, run_serving
from sims.simulation.students import StudentSection, distil_students


def test_a_student_node_serves_beside_a_teacher_node_and_the_broker_reports_it(
    tmp_path: Path, make_dataset, write_adapter
):
    data = make_dataset(tmp_path / "data", identities=16, cameras=2, test_ids=8)
    records = load_records(data)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    adapter = tmp_path / "adapter"
    version = write_adapter(adapter, 1)
    spec = json.loads(Path("common/model_configs/tiny.json").read_text())
    spec["image"] = {"type": "cnn", "widths": [8, 8], "depths": [1, 1], "groups": 4}
    (tmp_path / "student.json").write_text(json.dumps(spec))
    section = StudentSection(
        nodes=("node1",),
        model=str(tmp_path / "student.json"),
        source_epochs=1,
        node_epochs=1,
        calibration_crops=6,
    )
    students = distil_students(section, "tiny", adapter, train, by_node(train), tmp_path / "sim")
    assert set(students.dirs) == {"node1"}
    assert create_model(students.dirs["node1"]).teacher["model_version"] == version
    assert len(list(students.calibration.iterdir())) == 6

    emb = embed_records(create_model("tiny", adapter=adapter), test)
    result = run_serving(
        by_node(test),
        data,
        "tiny",
        adapter,
        version,
        emb,
        tmp_path / "serve",
        ServingSettings(max_queries=6, sheet_queries=0, concurrency=1),
        progress=False,
        students=students,
    )
    verdict = result.students["node1"]
    assert verdict["teacher_version"] == version
    assert verdict["model_version"] != version
    # one epoch on a dozen crops does not reach the teacher's space: fused by rank, and said
    assert verdict["verified"] is False and verdict["agreement"] < 0.9
    assert verdict["note"]
    assert result.queries == 6 and result.coverage_full == 1.0
    assert set(result.merge_modes) == {"rrf"}
