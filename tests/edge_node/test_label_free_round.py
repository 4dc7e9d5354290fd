"""A label-free round (issue 14): no captions, pseudo-identities mined, the adapter trained."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import RecordDict

from common.errors import ConfigError
from common.self_train import supcon_loss
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


def test_a_label_free_node_trains_without_captions_and_reports_its_pseudo_labels(
    tmp_path, tiny_dataset
):
    data, cfg, _, template, initial, digest = _setup(tiny_dataset, tmp_path, "fedavg")
    config = sent_config(cfg, digest)
    config["server-round"] = 1
    msg = _message(RecordDict({"arrays": initial, "config": config}), "train")
    node = {"data-path": str(data), "node-id": "node0", "label-free": True}
    reply = build_client_app()(msg, _context(node))
    assert not reply.has_error(), reply.error
    metrics = next(iter(reply.content.metric_records.values()))
    crops = 12  # node0's train images of the tiny dataset (2 captions each, ignored)
    assert metrics["num-examples"] == crops
    assert 1 <= metrics["pl-ids"] <= crops and metrics["pl-true-ids"] >= 1
    assert 0.0 <= metrics["pl-precision"] <= 1.0 and 0.0 <= metrics["pl-recall"] <= 1.0
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
