"""A label-free round (issue 14): no captions, pseudo-identities mined, the adapter trained."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from common.errors import ConfigError
from common.pseudo_captions import pseudo_captions, vocabulary
from common.self_train import CentroidMemory, SelfTrainWeights, supcon_loss
from edge_node.fl.client_app import build_client_app
from edge_node.fl.task import NodeFlSettings
from tests.integration.test_flower_payload import _context, _message, _setup, sent_config


def test_supcon_by_hand():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    ids = torch.tensor([0, 0, 1])
    t = 0.5
    # crop 0: positive crop 1 (cos 1), negative crop 2 (cos 0); crop 2 has no positive
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0)))
    assert abs(supcon_loss(img, ids, t).item() - expected) < 1e-6
    assert supcon_loss(img, torch.tensor([0, 1, 2]), t).item() == 0.0  # no positives


def test_centroid_memory_by_hand():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    ids = torch.tensor([5, 9, 9, 5])
    memory = CentroidMemory(
        torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]), ids, 0.5
    )
    assert torch.equal(memory.labels, torch.tensor([5, 9]))
    assert torch.allclose(memory.rows[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(
        memory.rows[1], torch.nn.functional.normalize(torch.tensor([0.6, 1.8]), dim=0)
    )
    # crop 1 against both centroids, its own (row 1) the target
    t = 0.5
    logits = feats[1:2] @ memory.rows.t() / t
    expected = -torch.log_softmax(logits, dim=1)[0, 1]
    assert abs(memory.loss(feats[1:2], torch.tensor([1]), t).item() - expected.item()) < 1e-6
    # an update moves a centroid halfway (momentum 0.5) to its crops' mean in the batch, only it
    before = memory.rows.clone()
    memory.update(feats[[1]], torch.tensor([0]))  # crop 0's identity (row 0) seen as [0, 1]
    moved = torch.nn.functional.normalize(torch.tensor([0.5, 0.5]), dim=0)
    assert torch.allclose(memory.rows[0], moved)
    assert torch.equal(memory.rows[1], before[1])
    with pytest.raises(ConfigError, match="momentum"):
        SelfTrainWeights(cluster=1.0, momentum=1.0)


def test_pseudo_captions_by_hand():
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    prompts = torch.nn.functional.normalize(prompts, dim=-1)
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    pc = pseudo_captions(emb, [7, 7, 3], prompts, [2, 1], scale=10.0)
    memory = torch.nn.functional.normalize(torch.tensor([1.6, 0.8]), dim=0)
    expected = torch.softmax(10.0 * memory @ prompts[:2].t(), dim=0)
    assert torch.allclose(pc.targets[0, :2], expected) and torch.equal(pc.targets[0], pc.targets[1])
    assert pc.targets[0, 2] == 1.0  # a slot of one phrase is certain
    assert torch.allclose(pc.targets[2, :2], torch.softmax(torch.tensor([0.0, 10.0]), dim=0))
    # a crop that scores like its identity's memory has nothing to learn; another does
    at_memory = torch.stack([memory, memory])
    assert pc.loss(at_memory, torch.tensor([0, 1])).item() < 1e-6
    assert pc.loss(torch.tensor(emb[:2]), torch.tensor([0, 1])).item() > 0.01
    assert 0.5 < pc.confidence() <= 1.0
    with pytest.raises(ValueError, match="3 prompts"):
        pseudo_captions(emb, [7, 7, 3], prompts, [2, 2], scale=10.0)


def test_the_vocabulary_has_no_duplicate_phrases():
    phrases = [p for slot in vocabulary().values() for p in slot]
    assert len(phrases) == len(set(phrases)) and all(len(s) >= 2 for s in vocabulary().values())


@pytest.mark.parametrize("text_weight, cluster", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_a_label_free_node_trains_without_captions_and_reports_its_pseudo_labels(
    tmp_path, tiny_dataset, text_weight, cluster
):
    data, cfg, _, template, initial, digest = _setup(tiny_dataset, tmp_path, "fedavg")
    config = sent_config(cfg, digest)
    config["server-round"] = 1
    msg = _message(RecordDict({"arrays": initial, "config": config}), "train")
    node = {"data-path": str(data), "node-id": "node0", "label-free": True,
            "label-free-text": text_weight, "label-free-cluster": cluster}  # fmt: skip
    reply = build_client_app()(msg, _context(node))
    assert not reply.has_error(), reply.error
    metrics = next(iter(reply.content.metric_records.values()))
    crops = 12  # node0's train images of the tiny dataset (2 captions each, ignored)
    assert metrics["num-examples"] == crops
    assert 1 <= metrics["pl-ids"] <= crops and metrics["pl-true-ids"] >= 1
    assert 0.0 <= metrics["pl-precision"] <= 1.0 and 0.0 <= metrics["pl-recall"] <= 1.0
    if text_weight:  # the pseudo-captions are soft: a softmax per slot, decided or not
        assert 0.0 < metrics["pc-confidence"] <= 1.0
    else:
        assert "pc-confidence" not in metrics
    (arrays,) = reply.content.array_records.values()
    trained = arrays.to_torch_state_dict()
    assert any(not torch.equal(trained[k], template[k]) for k in trained)


def test_label_free_nodes_are_named_in_the_run_config():
    settings = NodeFlSettings.from_configs(
        {"partition-id": 0, "num-partitions": 2}, {"data-path": "d", "label-free-nodes": "a, b"}
    )
    assert settings.label_free_nodes == ("a", "b") and settings.label_free is False


def test_label_free_loss_settings_are_read_and_bad_ones_refused_by_name():
    settings = NodeFlSettings.from_configs(
        {"label-free": "true", "label-free-anchor-weight": 2.5, "camera-norm": "true"},
        {"data-path": "d"},
    )
    assert settings.label_free and settings.camera_norm and settings.anchor_weight == 2.5
    for bad in ({"label-free-anchor-weight": -1.0}, {"label-free-anchor-weight": "nan"},
                {"label-free-anchor": "last"}):  # fmt: skip
        with pytest.raises(ConfigError, match="label-free-anchor"):
            NodeFlSettings.from_configs(bad, {"data-path": "d"})
    for key in ("label-free-text", "label-free-cluster", "label-free-link-window-s"):
        for bad in (-0.5, "nan"):
            with pytest.raises(ConfigError, match=key):
                NodeFlSettings.from_configs({key: bad}, {"data-path": "d"})
