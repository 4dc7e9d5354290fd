"""The fleet extrapolation (`fedretrieve bench fleet-model`): its pieces by hand."""

from __future__ import annotations

import numpy as np
import pytest

from sims.bench.fleet_model import Costs, Waiting, answer_times, fit_costs, simulate
from sims.bench.fleet_node import SiteModel


def test_flat_waits_for_the_last_answer_adaptive_for_the_quorum_plus_a_bounded_extra():
    arrivals = np.array([[1.0, 2.0, 3.0, 40.0]])
    stop, coverage = answer_times(arrivals, sent_ms=0.5, wait=Waiting())
    assert stop.tolist() == [40.0] and coverage.tolist() == [1.0]
    # 75% answered at 3 ms; then at most min(50, 0.5 * 3) = 1.5 ms more: the 40 ms call is cut
    stop, coverage = answer_times(arrivals, 0.5, Waiting(min_share=0.75))
    assert stop.tolist() == [4.5] and coverage.tolist() == [0.75]
    # sending takes longer than the answers: nothing ends before the last call is out
    stop, _ = answer_times(arrivals, sent_ms=60.0, wait=Waiting())
    assert stop.tolist() == [60.0]
    # the deadline bounds everything
    stop, coverage = answer_times(arrivals, 0.5, Waiting(deadline_ms=10.0))
    assert stop.tolist() == [10.0] and coverage.tolist() == [0.75]


def test_a_query_costs_the_fan_out_pace_plus_one_call():
    """No variance: n calls paced c apart, each answered rpc + body later."""
    site = SiteModel(body_ms=2.0, sigma=0.0)
    costs = Costs(broker_ms_per_site=0.5, sites_ms_per_site=1.5, rpc_ms=1.0, cores=2)
    own = simulate(100, site, costs, Waiting(), shared_cores=False, queries=10)
    assert own["p50_ms"] == pytest.approx(100 * 0.5 + 3.0)
    # sharing two cores with the sites: (0.5 + 1.5) / 2 = 1 ms per call
    shared = simulate(100, site, costs, Waiting(), shared_cores=True, queries=10)
    assert shared["p50_ms"] == pytest.approx(100 * 1.0 + 3.0)
    # two tiers of 10: each level sends 10 calls (5 ms) and adds one hop (1 ms)
    tiers = simulate(100, site, costs, Waiting(), shared_cores=False, levels=2, queries=10)
    assert tiers["p50_ms"] == pytest.approx(10 * 0.5 + 10 * 0.5 + 3.0 + 1.0)
    assert tiers["coverage_mean"] == 1.0


def test_stragglers_cut_by_the_adaptive_wait_lower_coverage_not_latency():
    site = SiteModel(body_ms=1.0, sigma=0.0, straggler_share=0.05, straggler_factor=(50, 50))
    costs = Costs(broker_ms_per_site=0.0, sites_ms_per_site=0.0, rpc_ms=0.0, cores=2)
    flat = simulate(200, site, costs, Waiting(), shared_cores=False, queries=200)
    cut = simulate(200, site, costs, Waiting(min_share=0.8), shared_cores=False, queries=200)
    assert flat["p50_ms"] == pytest.approx(50.0) and flat["coverage_mean"] == 1.0
    assert cut["p99_ms"] == pytest.approx(1.5)  # 1 ms, then 0.5 x 1 ms more
    assert 0.9 < cut["coverage_mean"] < 0.99


def test_costs_are_the_slopes_of_the_measured_cpu():
    runs = [
        {"nodes": n, "mode": "flat", "cpu_ms_per_query": 2 + 0.8 * n,
         "sites_cpu_ms_per_query": 1.2 * n}
        for n in (10, 100, 1000)
    ]  # fmt: skip
    report = {
        "runs": [*runs, {"nodes": 10, "mode": "adaptive", "cpu_ms_per_query": 99}],
        "site_model": {"body_ms": 1.0},
        "single_node": {"no_stragglers": {"p50_ms": 1.8}},
        "machine": {"cpus": 2},
    }
    costs = fit_costs(report)
    assert costs.broker_ms_per_site == pytest.approx(0.8)
    assert costs.sites_ms_per_site == pytest.approx(1.2)
    assert costs.rpc_ms == pytest.approx(0.8) and costs.cores == 2
