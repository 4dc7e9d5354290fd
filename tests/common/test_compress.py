"""Students and pruned towers (issue 15): shapes, what they keep of the teacher, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.datasets import load_records
from common.distill import DistillConfig, distill, image_agreement, make_student, save_student
from common.errors import ConfigError
from common.factory import create_model
from common.prune import prune_image_tower
from sims.cli import main as fedretrieve

SMALL_IMAGE = {"type": "cnn", "widths": [8, 8], "depths": [1, 1], "groups": 4, "stem_stride": 2}


def test_a_student_keeps_the_teachers_text_side_exactly():
    teacher = create_model("tiny")
    student = make_student(teacher, SMALL_IMAGE)
    texts = ["a person in a red top", "someone with blue trousers"]
    assert torch.equal(student.encode_text(texts), teacher.encode_text(texts))
    assert student.image_tower_params() < teacher.image_tower_params()
    assert student.teacher["model_version"] == teacher.version


def test_distillation_moves_the_student_into_the_teachers_space(tiny_dataset: Path):
    teacher = create_model("tiny")
    records = load_records(tiny_dataset, split="train")
    student = make_student(teacher, SMALL_IMAGE, seed=3)
    before = image_agreement(teacher, student, records)["cos_mean"]
    text_before = {n: p.clone() for n, p in student.text_tower.named_parameters()}
    result = distill(
        student, teacher, records, DistillConfig(epochs=15, lr=1e-2, batch_size=8, progress=False)
    )
    after = image_agreement(teacher, student, records)["cos_mean"]
    assert result.losses[-1] < result.losses[0]
    assert after > before + 0.2, (before, after)
    for name, param in student.text_tower.named_parameters():  # text side untouched
        assert torch.equal(param, text_before[name]), name


def test_a_student_directory_loads_like_any_model_and_names_its_teacher(tmp_path: Path):
    teacher = create_model("tiny")
    student = make_student(teacher, SMALL_IMAGE, {"size": [16, 8]})
    save_student(student, tmp_path / "student", report={"note": "test"})
    loaded = create_model(tmp_path / "student")
    assert loaded.teacher == student.teacher
    assert loaded.preprocess.size == (16, 8)
    assert loaded.version != teacher.version
    crops = torch.rand(2, 3, 16, 8)
    assert torch.allclose(loaded.encode_image(crops), student.encode_image(crops), atol=1e-6)
    meta = json.loads((tmp_path / "student" / "fedretrieve_model.json").read_text())
    assert meta["report"] == {"note": "test"}


def test_pruning_keeps_a_share_of_inner_channels_and_reloads(tmp_path: Path):
    from common.factory import save_model

    teacher = create_model("tiny")
    pruned = prune_image_tower(teacher, 0.5)
    blocks = [b for stage in pruned.image_tower.stages for b in stage]
    assert [b.conv1.out_channels for b in blocks] == [4, 8]  # widths 8, 16 halved
    assert pruned.spec["image"]["mids"] == [4, 8]
    assert pruned.image_tower_params() < teacher.image_tower_params()
    crops = torch.rand(3, 3, 32, 16)
    out = pruned.encode_image(crops)
    assert out.shape == (3, teacher.embed_dim) and torch.isfinite(out).all()
    save_model(pruned, tmp_path / "pruned")
    assert torch.allclose(create_model(tmp_path / "pruned").encode_image(crops), out, atol=1e-6)
    # the teacher is left as it was
    assert [b.conv1.out_channels for s in teacher.image_tower.stages for b in s] == [8, 16]


def test_pruning_keeps_the_strongest_filters():
    teacher = create_model("tiny")
    block = teacher.image_tower.stages[0][0]
    with torch.no_grad():
        block.conv1.weight.mul_(0.01)
        block.conv1.weight[[1, 6]] *= 1000  # the two strongest filters by far
    pruned = prune_image_tower(teacher, 0.5)
    kept = pruned.image_tower.stages[0][0].conv1.weight
    norms = kept.abs().sum(dim=(1, 2, 3))
    assert norms.topk(2).values.min() > 10 * norms.median()


@pytest.mark.parametrize("keep", [0.0, 1.5])
def test_pruning_refuses_a_share_outside_0_1(keep):
    with pytest.raises(ConfigError, match="keep"):
        prune_image_tower(create_model("tiny"), keep)


def test_pruning_refuses_a_tower_that_is_not_the_cnn():
    with pytest.raises(ConfigError, match="CNN"):
        prune_image_tower(create_model("tiny-effnet"), 0.5)


def test_the_distill_command_writes_a_student_with_its_report(tiny_dataset: Path, tmp_path: Path):
    cfg = tmp_path / "student.json"
    spec = json.loads((Path("common/model_configs/tiny.json")).read_text())
    spec["image"] = SMALL_IMAGE
    cfg.write_text(json.dumps(spec))
    out = tmp_path / "out"
    rc = fedretrieve(
        ["distill", "--teacher", "tiny", "--student", str(cfg), "--data", str(tiny_dataset),
         "--out", str(out), "--epochs", "2", "--batch-size", "8"]
    )  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "fedretrieve_model.json").read_text())
    assert meta["teacher"]["model_version"] == create_model("tiny").version
    assert set(meta["report"]["eval"]) == {"split", "teacher", "model", "agreement"}
    assert meta["report"]["crops"] == len(
        {r.image_path for r in load_records(tiny_dataset, split="train")}
    )


def test_the_distill_command_says_when_there_are_no_crops(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    rc = fedretrieve(
        ["distill", "--student", "tiny", "--teacher", "tiny", "--crops", str(tmp_path / "empty"),
         "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert rc == 2
    assert "no crops" in capsys.readouterr().err
