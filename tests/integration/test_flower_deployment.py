"""The same Flower app on the deployment engine: a SuperLink and SuperNodes as separate
processes on loopback, driven by `flwr run`, offline (tests/integration/flower_deployment.py).

Each SuperNode gets its own `--node-config` (data, node id, adapter dir), as a Jetson
would; the tests check that the run finishes, the server saved the global adapters and the
nodes received the final adapter in their adapter dirs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from common.adapters import read_manifest
from common.factory import create_model
from tests.integration.flower_deployment import flower_deployment


@pytest.mark.slow
@pytest.mark.redundant
@pytest.mark.timeout(600)
def test_two_supernodes_on_loopback_finish_a_run(tmp_path, tiny_dataset):
    """Excluded by default (`-m redundant` runs it; 56 s of the suite's budget): the same
    engine path (SuperLink, two SuperNodes, `flwr run`, round adapters, hand-over into each
    node's adapter dir) runs in tests/integration/test_label_free_deployment.py, from real
    daemons' galleries and with the daemons hot-swapping the result; `data-path` loading
    is the simulation's, covered in-process (test_flower_simulation.py)."""
    data, out = tiny_dataset, tmp_path / "out"
    with flower_deployment(tmp_path) as flower:
        for i in range(2):
            flower.add_supernode(
                f"supernode{i}",
                f"data-path='{data}' node-id='node{i}' adapter-dir='{tmp_path / f'adapters{i}'}' "
                "threads=1",
            )
        run = flower.run(
            f"model='tiny' num-server-rounds=1 max-steps=2 batch-size=8 fraction-evaluate=0.0 "
            f"out-dir='{out}' eval-data='{data}' round-timeout=300.0"
        )
        history = flower.finish(run, out, timeout_s=480)

    (round1,) = history["rounds"][1:]
    assert sorted(round1["accepted"]) == ["node0", "node1"]
    assert read_manifest(out / "round-001").round == 1
    create_model("tiny", adapter=out / "final")  # loadable
    final = read_manifest(out / "final").adapter_fingerprint
    assert sorted(history["handover"]) == ["node0", "node1"]
    for i in range(2):
        assert read_manifest(tmp_path / f"adapters{i}" / "federated").adapter_fingerprint == final


def _three_node_dataset(root: Path, make_dataset) -> Path:
    data = make_dataset(root, identities=18)
    path = data / "annotations.json"
    entries = json.loads(path.read_text())
    for i, entry in enumerate(entries):
        entry["node"] = f"node{i % 3}"
    path.write_text(json.dumps(entries))
    return data


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "kill",
    [
        pytest.param(False, marks=pytest.mark.redundant),
        pytest.param(True, marks=pytest.mark.redundant),
    ],
    ids=["all-nodes", "one-killed-mid-round"],
)
def test_secagg_deployment_on_three_supernodes(tmp_path, make_dataset, kill):
    """SecAgg+ over a real SuperLink and three SuperNodes; with `kill`, node2 is killed
    (SIGKILL) once it is in the masked-vector stage, after the keys were shared.

    Both cases are excluded by default (`-m redundant` runs them): the kill case took 146 s
    of a suite that had grown past its 10 minutes on 2 cores (60 s of it the round timeout
    the dead node costs). The protocol path of a node lost in the masked stage runs
    in-process in tests/integration/test_flower_privacy.py
    (`test_secagg_survives_a_node_lost_in_the_masked_stage`), and a real SuperLink with
    SuperNodes in tests/integration/test_label_free_deployment.py; what only this test
    checks is SecAgg+ surviving a SIGKILLed SuperNode process.
    """
    data = _three_node_dataset(tmp_path / "data", make_dataset)
    out = tmp_path / "out"
    with flower_deployment(tmp_path) as flower:
        node_procs = [
            flower.add_supernode(
                f"supernode{i}",
                f"data-path='{data}' node-id='node{i}' "
                f"adapter-dir='{tmp_path / f'adapters{i}'}' threads=1",
            )
            for i in range(3)
        ]
        run = flower.run(
            f"model='tiny' strategy='fedavg' num-server-rounds=1 max-steps=20 batch-size=4 "
            f"fraction-evaluate=0.0 local-eval=false min-nodes=3 secure-aggregation=true "
            f"out-dir='{out}' eval-data='{data}' round-timeout=60.0"
        )
        killed = False
        if kill:
            victim, _ = node_procs[2]
            deadline = time.monotonic() + 240
            while not killed and time.monotonic() < deadline and run.poll() is None:
                logs = [p.read_text(errors="replace") for p in tmp_path.glob("supernode2*.log")]
                if any("training, then masking" in text for text in logs):
                    os.killpg(victim.pid, signal.SIGKILL)
                    killed = True
                else:
                    time.sleep(0.1)
            assert killed, "node2 never reached the masked-vector stage"
        history = flower.finish(run, out)

    (round1,) = history["rounds"][1:]
    secagg = round1["secagg"]
    assert secagg["completed"] and secagg["exposed_arrays"] == 0
    assert round1["secure"] is True
    create_model("tiny", adapter=out / "final")
    final = read_manifest(out / "final").adapter_fingerprint
    if not kill:
        assert secagg["survivors"] == 3 and sorted(round1["accepted"]) == [
            "node0", "node1", "node2"
        ]  # fmt: skip
        assert sorted(history["handover"]) == ["node0", "node1", "node2"]
    else:
        # node2 died after sharing its keys: either its masked vector never arrived (the
        # others' masks on it were removed with the shares of its neighbours), or it did
        # and its own mask was removed without it; the sum was unmasked either way
        assert secagg["survivors"] + secagg["dropped"] == 3 and secagg["survivors"] >= 2
        assert "node2" not in {k for k, v in history["handover"].items() if "error" not in v}
    for i in range(3 if not kill else 2):
        assert read_manifest(tmp_path / f"adapters{i}" / "federated").adapter_fingerprint == final
