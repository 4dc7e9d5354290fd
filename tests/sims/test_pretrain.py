"""Base-model pre-training on the source split, and its cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.datasets import load_records
from common.errors import ConfigError, DatasetError
from common.factory import create_model
from sims.pretrain import (
    REPORT_FILE,
    PretrainConfig,
    data_fingerprint,
    ensure_base_model,
    pretrain,
    split_source,
)
from sims.synth import SynthConfig, generate
from sims.synth.headroom import measure_headroom

TINY = dict(model="tiny", epochs=2, batch_size=16, holdout=0.25)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    cfg = SynthConfig(
        identities=4,
        source_identities=8,
        cameras=2,
        nodes=1,
        images_per_camera=1,
        source_cameras=2,
        size=(64, 32),
        cameras_per_identity=(1, 2),
    )
    generate(cfg, out, workers=1)
    return out


def test_holdout_is_disjoint_by_identity(data):
    train, held = split_source(load_records(data, split="source"), 0.25, seed=0)
    assert {r.person_id for r in held} and not (
        {r.person_id for r in train} & {r.person_id for r in held}
    )
    assert len({r.person_id for r in held}) == 2  # 25% of 8 source identities


def test_pretrain_trains_the_image_side_and_saves_a_loadable_model(data, tmp_path):
    report = pretrain(data, tmp_path / "base", PretrainConfig(**TINY), progress=False)
    assert report["source_test"]["gallery"] > 0 and len(report["losses"]) == 2
    assert json.loads((tmp_path / "base" / REPORT_FILE).read_text())["losses"] == report["losses"]
    init, base = create_model("tiny"), create_model(tmp_path / "base")
    assert base.version != init.version
    stem_before = init.image_tower.stem.conv.weight
    assert not torch.equal(base.image_tower.stem.conv.weight, stem_before)
    for (name, a), b in zip(
        init.text_tower.state_dict().items(), base.text_tower.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), f"text tower must stay frozen: {name} changed"
    assert base.encode_text(["a man in a red coat"]).shape == (1, base.embed_dim)


def test_frozen_image_stages_keep_their_start_weights(data, tmp_path):
    """`frozen_image_stages` keeps the stem and the first blocks at their start (ImageNet in
    `default`) and trains the rest; the frozen part is then computed once per crop."""
    cfg = PretrainConfig(**{**TINY, "model": "tiny-effnet", "frozen_image_stages": 2})
    pretrain(data, tmp_path / "base", cfg, progress=False)
    init, base = create_model("tiny-effnet"), create_model(tmp_path / "base")
    stages_init, stages_base = init.image_tower._stages(), base.image_tower._stages()
    for i, (a, b) in enumerate(zip(stages_init, stages_base, strict=True)):
        same = all(
            torch.equal(x, y)
            for ma, mb in zip(a, b, strict=True)
            for x, y in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True)
        )
        assert same == (i < 2), f"stage {i}: frozen {i < 2}, unchanged {same}"
    # the CNN has no stages (and no pretrained start to keep): it trains in full
    report = pretrain(data, tmp_path / "cnn", PretrainConfig(**TINY), progress=False)
    assert report["frozen_image_stages"] == 0 and PretrainConfig().frozen_image_stages > 0
    with pytest.raises(ConfigError, match=">= 0"):
        PretrainConfig(frozen_image_stages=-1)


def test_ensure_base_model_builds_once_then_reuses(data, tmp_path):
    cache = tmp_path / "cache"
    first = ensure_base_model(data, cache, progress=False, **TINY)
    stamp = (first / REPORT_FILE).stat().st_mtime_ns
    again = ensure_base_model(data, cache, progress=False, **TINY)
    assert again == first and (again / REPORT_FILE).stat().st_mtime_ns == stamp
    other = ensure_base_model(data, cache, progress=False, **{**TINY, "epochs": 1})
    assert other != first
    assert not [p for p in (cache / "base-models").iterdir() if ".tmp-" in p.name]
    assert create_model(first).fingerprint != create_model(other).fingerprint


def test_fingerprint_follows_the_source_images(data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    assert data_fingerprint(copy) == data_fingerprint(data)
    src = next(r for r in load_records(copy, split="source"))
    src.image_path.write_bytes(src.image_path.read_bytes() + b"\0")
    assert data_fingerprint(copy) != data_fingerprint(data)


def test_no_source_split_is_a_clean_error(tmp_path):
    out = tmp_path / "nosrc"
    generate(
        SynthConfig(identities=4, source_identities=0, cameras=2, nodes=1, size=(64, 32)),
        out,
        workers=1,
    )
    with pytest.raises(DatasetError, match="source"):
        pretrain(out, tmp_path / "m", PretrainConfig(**TINY), progress=False)


def test_cli_pretrain_into_the_cache(data, tmp_path, monkeypatch, capsys):
    from sims.cli import main

    monkeypatch.setenv("FEDRETRIEVE_CACHE", str(tmp_path / "envcache"))
    argv = ["pretrain", "--data", str(data), "--model", "tiny", "--epochs", "1",
            "--batch-size", "16", "--holdout", "0.25", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "envcache") in out and "source test" in out
    assert len(list((tmp_path / "envcache" / "base-models").iterdir())) == 1


def test_headroom_reports_every_label_free_baseline_beside_centralised_lora(data, tmp_path):
    """The acceptance tool of the benchmark: camera norm and the sceptic's colour matches
    are evaluated in the same run, and the honesty check is computed from them."""
    pretrain(data, tmp_path / "base", PretrainConfig(**TINY), progress=False)
    out = measure_headroom(data, tmp_path / "base", epochs=1, lr=1e-3)
    assert set(out["sceptics_R1"]) == {"hue_turn", "hue_turn_person", "colour_moments"}
    assert all(0.0 <= r1 <= 100.0 for r1 in out["sceptics_R1"].values())
    zero, gain = out["target_zero_shot"]["R1"], out["lora_gain_R1"]
    assert gain == round(out["centralised_lora"]["R1"] - zero, 2)
    strongest = max(
        [out["camera_norm_gain_R1"], *(r1 - zero for r1 in out["sceptics_R1"].values())]
    )
    check = out["acceptance"]["strongest_sceptic_recovers_at_most_a_third"]
    assert check == (strongest <= gain / 3)
    assert set(out["per_camera_R1"]) == {"c01", "c02"}
