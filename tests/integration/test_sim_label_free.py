"""The miniature simulation with label-free nodes (issue 14): the report says so.

The mixed fleet trains from the nodes' own daemons (`[federated] from-galleries`): each
node's train crops go into a real `fedretrieve node serve` over Ingest, without captions at
the label-free node, and the Flower clients read those galleries."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sims.simulation.pipeline import load_sim_config, run_sim


@pytest.mark.parametrize(
    ("options", "method", "from_galleries"),
    [
        # every node label-free, sharing its tracklet memories through the server
        ({"label_free": True, "share_memories": True}, "federated_label_free", False),
        # a mixed fleet: node1 trains on its captions, node2 without; the pseudo-label figures
        # come from node2's reply alone (the strategy's mean keeps only shared keys)
        ({"label_free_nodes": "node2"}, "federated_mixed", True),
    ],
    ids=["label-free", "mixed"],
)
def test_a_label_free_fleet_reports_its_pseudo_labels_every_round(
    tmp_path: Path, options: dict, method: str, from_galleries: bool
) -> None:
    base = load_sim_config(Path("sims/configs/mini.toml"))
    fed = dataclasses.replace(
        base.federated,
        strategies=("fedavg",),
        default="fedavg",
        rounds=2,
        options=options,
        from_galleries=from_galleries,
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
    # the supervised baselines are named as such beside a label-free run
    assert "a supervised reference" in (tmp_path / "run" / "report.md").read_text()
    other = {"federated_label_free", "federated_mixed"} - {method}
    assert not other & set(report["methods"])
    rounds = report["pseudo_labels"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
        assert r["pseudo_ids"] >= 1 and r["true_ids"] >= 1
        assert 0.0 < r["tracklet_purity"] <= 1.0
    comm = report["communication"]
    if options.get("share_memories"):  # round 2 carries round 1's memories of the other node
        assert "shared_received" not in rounds[0] and rounds[1]["shared_received"] >= 1
        assert 0 <= rounds[1]["shared_joined"] <= rounds[1]["shared_received"]
        assert comm["memory_upload_bytes_per_node_per_round_max"] > 0
        assert comm["memory_download_bytes_per_node_per_round_max"] > 0
        assert "Shared tracklet memories" in (tmp_path / "run" / "report.md").read_text()
    else:
        assert "memory_upload_bytes_per_node_per_round_max" not in comm
    if from_galleries:  # what each daemon holds is what its node trained on
        from edge_node.serving.gallery import read_catalog

        roots = tmp_path / "run" / "train-galleries"
        rows = {n: read_catalog(roots / n / "data" / "gallery") for n in ("node1", "node2")}
        assert rows["node1"] and rows["node2"]
        assert all(r.captions for r in rows["node1"]) and not any(r.captions for r in rows["node2"])
        assert "train_galleries" in report["timing"]["stages_s"]
