"""`fedretrieve fl check`: a run config as `flwr run --run-config` sends it, bad keys named."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from sims.simulation.fl_cli import check_run_config

ROOT = Path(__file__).resolve().parents[2]


def test_misspelt_key_is_named_with_the_closest_declared_one():
    with pytest.raises(ConfigError, match=r"`num-server-round`.*did you mean `num-server-rounds`"):
        check_run_config(ROOT, "num-server-round=3")


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match="`strategy` must be one of"):
        check_run_config(ROOT, "strategy='fedsgd'")


def test_good_config_states_its_privacy_and_epsilon():
    line = check_run_config(
        ROOT, "secure-aggregation=true min-nodes=4 dp='client-fixed' num-server-rounds=2"
    )
    assert line.startswith("ok: 2 rounds of ffa, min-nodes 4, SecAgg+, dp client-fixed")
    from server.fl.privacy import rdp_epsilon

    assert f"epsilon {rdp_epsilon(1.0, 1.0, 2, 1e-5):.3f}" in line
    assert check_run_config(ROOT, "").startswith("ok: 3 rounds of ffa")
