"""The miniature simulation with label-free nodes (issue 14): the report says so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sims.simulation.pipeline import load_sim_config, run_sim


@pytest.mark.parametrize(
    ("options", "method"),
    [
        ({"label_free": True}, "federated_label_free"),
        # a mixed fleet: node1 trains on its captions, node2 without; the pseudo-label figures
        # come from node2's reply alone (the strategy's mean keeps only shared keys)
        ({"label_free_nodes": "node2"}, "federated_mixed"),
    ],
    ids=["label-free", "mixed"],
)
def test_a_label_free_fleet_reports_its_pseudo_labels_every_round(
    tmp_path: Path, options: dict, method: str
) -> None:
    base = load_sim_config(Path("sims/configs/mini.toml"))
    fed = dataclasses.replace(
        base.federated,
        strategies=("fedavg",),
        default="fedavg",
        rounds=2,
        options=options,
    )
    cfg = dataclasses.replace(
        base,
        federated=fed,
        serve=False,
        camera_norm=False,  # the raw-crop path (the mini config normalises)
        baselines=dataclasses.replace(base.baselines, local_only=False, centralized=False),
    )
    report = run_sim(cfg, tmp_path / "run", tmp_path / "cache", progress=False)
    assert report["methods"][method] == report["methods"]["federated"]
    other = {"federated_label_free", "federated_mixed"} - {method}
    assert not other & set(report["methods"])
    rounds = report["pseudo_labels"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
        assert r["pseudo_ids"] >= 1 and r["true_ids"] >= 1
        assert 0.0 < r["tracklet_purity"] <= 1.0
