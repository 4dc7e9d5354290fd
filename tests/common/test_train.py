"""Training lowers the loss and lifts Rank-1 well above chance; CLI train/eval run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from common.datasets import load_records
from common.errors import ConfigError
from common.evaluate import evaluate
from common.factory import create_model
from common.lora import LoraSettings, attach_lora, get_adapter_state
from common.train import TextFeatureCache, TrainConfig, contrastive_loss, set_trainable, train


@pytest.fixture(scope="module")
def pool(tmp_path_factory, make_dataset) -> list:
    root = make_dataset(tmp_path_factory.mktemp("pool"), identities=20, test_ids=0)
    return load_records(root)


@pytest.mark.parametrize("name", ["tiny", "tiny-clip"])
def test_lora_training_learns(pool, name: str) -> None:
    model = create_model(name)
    chance = 100.0 * 3 / 60  # 3 images of the person among 60
    before = evaluate(model, pool)
    peft_model = attach_lora(
        model,
        LoraSettings.from_spec(model.spec["lora"], modules_to_save=("image_proj", "text_proj")),
    )
    frozen = {n: p.clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    result = train(peft_model, pool, TrainConfig(epochs=12, lr=5e-3, batch_size=16, progress=False))
    after = evaluate(peft_model, pool)
    assert result.losses[-1] < 0.8 * result.losses[0]
    assert result.num_examples == 120 and result.steps == 12 * 8
    assert after["R1"] >= max(4 * chance, before["R1"] + 20)
    # only adapter parameters moved
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)


def test_training_is_deterministic(pool) -> None:
    states = []
    for _ in range(2):
        p = attach_lora(create_model("tiny"))
        train(p, pool, TrainConfig(epochs=1, batch_size=16, progress=False))
        states.append(get_adapter_state(p))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fedprox_term_pulls_towards_the_reference(pool) -> None:
    drift = []
    for mu in (0.0, 50.0):
        p = attach_lora(create_model("tiny"))
        ref = {n: t.detach().clone() for n, t in p.named_parameters() if t.requires_grad}
        train(
            p,
            pool,
            TrainConfig(
                epochs=1, lr=1e-2, batch_size=16, proximal_mu=mu, max_steps=4, progress=False
            ),
            reference=ref,
        )
        drift.append(
            sum(float((t - ref[n]).pow(2).sum()) for n, t in p.named_parameters() if n in ref)
        )
    assert drift[1] < drift[0]


def test_full_training_of_chosen_parts(pool) -> None:
    model = create_model("tiny")
    set_trainable(model, ["image_tower", "image_proj"])
    text_before = model.encode_text(["a red top"])
    train(model, pool, TrainConfig(epochs=1, batch_size=16, progress=False))
    assert torch.equal(model.encode_text(["a red top"]), text_before)  # text tower frozen


def test_id_aware_loss_treats_same_person_as_positive() -> None:
    # crops 0 and 1: if they show one person, each caption may match either
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.44], [0.0, 1.0]]), dim=1)
    txt = img[[1, 0, 2]].clone()  # the captions of crops 0 and 1 look like the other crop
    scale = torch.tensor(10.0)
    same = contrastive_loss(img, txt, torch.tensor([1, 1, 2]), scale)
    diff = contrastive_loss(img, txt, torch.tensor([1, 3, 2]), scale)
    assert same < diff


def test_bad_configs_are_refused(pool) -> None:
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match="nothing to train"):
        model = create_model("tiny")
        model.requires_grad_(False)
        train(model, pool, TrainConfig(progress=False))


def test_cli_train_then_eval(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    from sims.cli import main

    out = tmp_path / "adapter"
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_dataset),
                "--model",
                "tiny",
                "--out",
                str(out),
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--lr",
                "0.005",
            ]
        )
        == 0
    )
    assert (out / "adapter_model.safetensors").is_file()
    metrics_path, results = tmp_path / "m.json", tmp_path / "results.csv"
    assert (
        main(
            [
                "eval",
                "--data",
                str(tiny_dataset),
                "--model",
                "tiny",
                "--adapter",
                str(out),
                "--json",
                str(metrics_path),
                "--results",
                str(results),
                "--topk",
                "3",
            ]
        )
        == 0
    )
    metrics = json.loads(metrics_path.read_text())
    assert {"R1", "R5", "R10", "mAP", "mINP", "queries", "gallery"} <= set(metrics)
    assert metrics["queries"] == 24 and metrics["gallery"] == 12
    rows = list(csv.DictReader(results.open()))
    assert len(rows) == 24 * 3 and rows[0]["image"].endswith(".jpg")
    assert "R1" in capsys.readouterr().out
    # a user error is a clean message and exit code 2, not a traceback
    assert main(["eval", "--data", str(tmp_path / "missing"), "--model", "tiny"]) == 2
    assert "dataset not found" in capsys.readouterr().err


def test_text_feature_cache_round_trips_through_a_file(tmp_path: Path) -> None:
    model = create_model("tiny")
    captions = ["a man in a red coat", "a woman with a black backpack", "grey jeans"]
    cache = TextFeatureCache(model.fingerprint)
    expected = cache.get(model, captions)
    path = cache.save(tmp_path / "text.pt")

    again = TextFeatureCache.load(path, model.fingerprint)
    assert set(again.features) == set(captions)
    assert torch.equal(again.get(model, captions), expected)  # served from the file
    with torch.no_grad():
        fresh = model.eval().text_backbone(captions)  # eval: no dropout, as the cache encodes
    assert torch.allclose(fresh, expected, atol=1e-5)

    # another base model, a missing file or a corrupt one: an empty cache, never an error
    assert TextFeatureCache.load(path, "another-model").features == {}
    assert TextFeatureCache.load(tmp_path / "missing.pt", model.fingerprint).features == {}
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    assert TextFeatureCache.load(tmp_path / "bad.pt", model.fingerprint).features == {}
