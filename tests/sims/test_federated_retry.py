"""The simulation retries once when Ray's head fails to start, and only then."""

from __future__ import annotations

from sims.simulation.federated import _ray_did_not_start


def _chained(innermost: str) -> RuntimeError:
    try:
        try:
            try:
                raise RuntimeError(innermost)
            except RuntimeError as ray_err:
                raise RuntimeError("Simulation Runtime crashed.") from ray_err
        except RuntimeError as vce_err:
            raise RuntimeError("An error was encountered. Ending simulation.") from vce_err
    except RuntimeError as err:
        return err


def test_rays_start_up_timeout_is_recognised_through_flowers_wrapping():
    err = _chained("Timed out waiting for file /tmp/ray/session_1/gcs_server_port_ab12")
    assert _ray_did_not_start(err)


def test_any_other_failure_is_not_retried():
    assert not _ray_did_not_start(_chained("CUDA out of memory"))
    assert not _ray_did_not_start(RuntimeError("Timed out waiting for file /tmp/x"))
