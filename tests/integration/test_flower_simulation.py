"""A 2-node, 2-round federated run on Flower's simulation engine (Ray), tiny model."""

from __future__ import annotations

import json

import pytest

from common.adapters import read_manifest
from common.factory import create_model
from sims.simulation.federated import run_federated


@pytest.mark.slow
def test_two_node_simulation_writes_loadable_adapters(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    data = tiny_dataset
    out = tmp_path / "out"
    result = run_federated(
        data,
        nodes=2,
        rounds=2,
        strategy="ffa",
        model_spec="tiny",
        out_dir=out,
        options={"max-steps": 3, "batch-size": 8},
        cpus=2,
    )
    # every round saved, the final adapter loads onto the base model
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    for n in (1, 2):
        assert read_manifest(out / f"round-{n:03d}").round == n
    model = create_model("tiny", adapter=result.final_adapter)
    assert model.version == json.loads((out / "history.json").read_text())["final_model_version"]
    # both nodes took part in every round and sent B only, the same bytes each
    for row in result.rounds[1:]:
        assert sorted(row["accepted"]) == ["node0", "node1"]
        assert set(row["upload_bytes"].values()) == {result.payload_bytes}
        assert row["seconds"] > 0
    assert len(result.metric("R1")) == 3  # server-side held-out eval before and after rounds
    # the hand-over reached both virtual nodes' adapter dirs
    assert sorted(result.handover) == ["node0", "node1"]
    for node in ("node0", "node1"):
        handed = out / "nodes" / node / "adapters" / "federated"
        assert (
            read_manifest(handed).adapter_fingerprint
            == read_manifest(out / "final").adapter_fingerprint
        )
