"""The simulation report's privacy entry comes from the ServerApp's history.json."""

from __future__ import annotations

import json

import pytest

from common.errors import Unavailable
from sims.simulation.federated import FederatedResult
from sims.simulation.report import privacy_line


def _history(tmp_path, **extra):
    data = {
        "rounds": [{"round": 0}, {"round": 1, "epsilon": 4.7285}],
        "final": str(tmp_path / "final"),
        "payload_bytes": 10,
        "model_parameters": 100,
        "wall_seconds": 1.0,
        "privacy": {
            "secure_aggregation": True,
            "dp": "client-fixed",
            "epsilon": 4.7285,
            "delta": 1e-5,
        },
        **extra,
    }
    (tmp_path / "history.json").write_text(json.dumps(data))


def test_privacy_entry_and_epsilon_per_round(tmp_path):
    _history(tmp_path)
    result = FederatedResult.from_history(tmp_path)
    assert result.privacy["epsilon"] == 4.7285 and result.privacy["secure_aggregation"]
    assert result.epsilon() == [None, 4.7285]
    line = privacy_line(result.privacy)
    assert "SecAgg+" in line and "epsilon 4.729 at delta 1e-05" in line
    assert "without differential privacy" in privacy_line({"dp": "off"})


def test_a_failed_run_is_reported_with_its_reason(tmp_path):
    _history(tmp_path, failed="no round of 3 aggregated an update")
    with pytest.raises(Unavailable, match="no round of 3 aggregated"):
        FederatedResult.from_history(tmp_path)
