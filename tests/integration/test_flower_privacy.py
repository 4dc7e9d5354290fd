"""Private training on Flower's simulation engine, tiny model, three virtual nodes.

SecAgg+ gives the adapter the clear run gives (to its fixed-point precision) while the
server receives no update in the clear; a node lost in the masked-vector stage leaves the
others' sum intact; with DP every round states the accountant's epsilon; a run in which no
round aggregates fails without writing or handing over an adapter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.errors import Unavailable
from server.fl.privacy import rdp_epsilon
from sims.bench.privacy import DropInMaskedStage
from sims.simulation.federated import run_federated

BASE = {"max-steps": 2, "batch-size": 8, "fraction-evaluate": 0.0, "local-eval": False}
NODES = ("node0", "node1", "node2")


@pytest.fixture
def three_nodes(tmp_path, make_dataset, monkeypatch) -> Path:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    root = make_dataset(tmp_path / "data", identities=18)
    path = root / "annotations.json"
    entries = json.loads(path.read_text())
    for i, entry in enumerate(entries):
        entry["node"] = NODES[i % 3]
    path.write_text(json.dumps(entries))
    return root


def _run(data, out, rounds=1, client_mods=(), **options):
    return run_federated(
        data,
        nodes=3,
        rounds=rounds,
        strategy="fedavg",
        model_spec="tiny",
        out_dir=out,
        options={**BASE, **options},
        cpus=2,
        client_mods=client_mods,
    )


def _adapter(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_secagg_gives_the_clear_adapter_and_no_update_in_the_clear(tmp_path, three_nodes):
    clear = _run(three_nodes, tmp_path / "clear")
    # max-weight just above the nodes' weights: the fixed-point grid is as fine as it gets
    secure = _run(
        three_nodes, tmp_path / "secure", **{"secure-aggregation": True, "secagg-max-weight": 64.0}
    )
    a, b = _adapter(clear.final_adapter), _adapter(secure.final_adapter)
    assert sorted(a) == sorted(b)
    moved = max(
        float(np.abs(a[k] - _adapter(tmp_path / "clear" / "round-001")[k]).max()) for k in a
    )
    assert moved == 0.0  # the clear run's final is its round 1
    base = {k: v * 0 for k, v in a.items()}  # B starts at 0: the update must be non-trivial
    assert max(float(np.abs(a[k] - base[k]).max()) for k in a if "lora_B" in k) > 1e-4
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=5e-5, err_msg=k)

    (row,) = secure.rounds[1:]
    assert row["secure"] is True  # the strategy was given the aggregate, not the updates
    assert sorted(row["accepted"]) == list(NODES)
    secagg = row["secagg"]
    assert secagg["completed"] and secagg["survivors"] == 3 and secagg["dropped"] == 0
    assert secagg["exposed_arrays"] == 0  # no reply carried an ArrayRecord with data
    # what each node uploaded is its masked vector, not the adapter's float32 bytes
    assert set(row["upload_bytes"]) == set(NODES)
    assert all(v > 0 for v in row["upload_bytes"].values())
    assert secure.privacy["secure_aggregation"] is True and secure.privacy["epsilon"] is None
    assert clear.rounds[1]["secure"] is False and "secagg" not in clear.rounds[1]
    assert sorted(secure.handover) == list(NODES)


@pytest.mark.slow
def test_secagg_survives_a_node_lost_in_the_masked_stage(tmp_path, three_nodes):
    result = _run(
        three_nodes,
        tmp_path / "out",
        client_mods=(DropInMaskedStage(partition=0, server_round=1),),
        **{"secure-aggregation": True},
    )
    (row,) = result.rounds[1:]
    secagg = row["secagg"]
    assert secagg["sampled"] == 3 and secagg["survivors"] == 2 and secagg["dropped"] == 1
    assert secagg["completed"] and secagg["exposed_arrays"] == 0
    assert sorted(row["accepted"]) == ["node1", "node2"]  # partition 0 is node0
    assert result.final_adapter.is_dir()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_dp_states_the_accountants_epsilon_every_round(tmp_path, three_nodes):
    handler = _Lines()
    logger = logging.getLogger("flwr").getChild("server.fl.server_app")
    logger.addHandler(handler)
    try:
        result = _run(
            three_nodes,
            tmp_path / "out",
            rounds=2,
            **{
                "secure-aggregation": True,  # client-side DP composes with SecAgg+
                "dp": "client-fixed",
                "dp-noise-multiplier": 1.5,
                "dp-clip-norm": 0.05,
                "dp-delta": 1e-4,
            },
        )
    finally:
        logger.removeHandler(handler)
    expected = [rdp_epsilon(1.5, 1.0, r, 1e-4) for r in (1, 2)]
    assert [r["epsilon"] for r in result.rounds[1:]] == pytest.approx(expected, abs=1e-6)
    assert result.privacy == {
        "secure_aggregation": True,
        "dp": "client-fixed",
        "epsilon": pytest.approx(expected[-1], abs=1e-6),
        "delta": 1e-4,
        "noise_multiplier": 1.5,
        "sampling_rate": 1.0,
        "releases": 2,
    }
    round_lines = [line for line in handler.lines if line.startswith("round ") and "/2:" in line]
    assert len(round_lines) == 2
    for line, eps in zip(round_lines, expected, strict=True):
        assert f"epsilon {eps:.3f} (delta 0.0001)" in line
    # uniform weights under DP: every node reported num-examples = 1
    assert all(r["secagg"]["survivors"] == 3 for r in result.rounds[1:])


@pytest.mark.slow
def test_server_side_dp_in_the_clear(tmp_path, three_nodes):
    result = _run(
        three_nodes,
        tmp_path / "out",
        **{
            "dp": "server-adaptive",
            "dp-noise-multiplier": 0.5,
            "dp-clipped-count-stddev": 1.0,
            "dp-clip-norm": 0.05,
        },
    )
    (row,) = result.rounds[1:]
    assert row["secure"] is False and sorted(row["accepted"]) == list(NODES)
    assert row["epsilon"] == pytest.approx(rdp_epsilon(0.5, 1.0, 1, 1e-5), abs=1e-6)


@pytest.mark.slow
def test_a_run_no_round_improved_fails_and_hands_nothing_over(tmp_path, three_nodes):
    out = tmp_path / "out"
    with pytest.raises(Unavailable, match="no round of 1 aggregated an update"):
        _run(three_nodes, out, **{"max-update-norm": 1e-12})  # every update rejected
    history = json.loads((out / "history.json").read_text())
    assert "3 rejected update(s)" in history["failed"]
    assert "final" not in history and "handover" not in history
    assert not (out / "final").exists()
    assert not (out / "nodes").exists()  # no node received an adapter
    assert (out / "round-001").is_dir()  # the round itself is still on record
