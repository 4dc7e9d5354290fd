"""The simulation starts Ray itself and retries when Ray's head misses its start-up deadline.

The failure is injected into `ray.init` (a real start takes seconds and cannot be made to
time out on demand); what is tested is our start-up loop around it.
"""

from __future__ import annotations

import pytest
import ray

from common.errors import Unavailable
from sims.simulation import federated

GCS_TIMEOUT = "Timed out waiting for file /tmp/ray/session_1/gcs_server_port_ab12"


def _failing(times: int, calls: list):
    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) <= times:
            raise RuntimeError(GCS_TIMEOUT)

    return init


def test_a_head_that_misses_its_deadline_is_started_again(monkeypatch):
    calls: list = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _failing(federated.RAY_START_ATTEMPTS - 1, calls))
    federated._start_ray({"num_cpus": 1})
    assert len(calls) == federated.RAY_START_ATTEMPTS
    assert all(c["num_cpus"] == 1 and "PYTHONPATH" in c["runtime_env"]["env_vars"] for c in calls)


def test_after_the_last_attempt_the_error_says_what_failed(monkeypatch):
    calls: list = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _failing(99, calls))
    with pytest.raises(Unavailable, match="gcs_server_port") as err:
        federated._start_ray({})
    assert f"{federated.RAY_START_ATTEMPTS} attempts" in str(err.value)
    assert len(calls) == federated.RAY_START_ATTEMPTS


def test_a_running_ray_is_left_as_it_is(monkeypatch):
    calls: list = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", _failing(0, calls))
    federated._start_ray({})
    assert calls == []
