"""bench fleet, tiny: real sites and brokers on loopback, the JSON contract of issue 19."""

from __future__ import annotations

import argparse
import json

import pytest

from sims.bench.fleet import main, register_bench

pytestmark = pytest.mark.timeout(300)


def test_a_tiny_fleet_run_keeps_the_contract_and_says_where_the_time_goes(tmp_path):
    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers())
    out = tmp_path / "fleet.json"
    args = parser.parse_args(
        ["fleet", "--json", str(out), "--nodes", "3,6", "--queries", "4", "--vectors", "20",
         "--modes", "flat,adaptive,tiered", "--sites-per-host", "3", "--host-threads", "4"]
    )  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert 0 < report["single_node"]["p50_ms"] <= report["single_node"]["p99_ms"]
    runs = {(r["nodes"], r["stragglers"], r["mode"]): r for r in report["runs"]}
    assert {(n, m) for n, _, m in runs} == {
        (n, m) for n in (3, 6) for m in ("flat", "adaptive", "tiered")
    }
    for row in runs.values():
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert 0.0 <= row["coverage_mean"] <= 1.0 and row["bytes_per_query"] > 0
        assert row["cpu_ms_per_query"] > 0
        if row["coverage_mean"] == 1.0:  # every site answered: the merge is the exact top-k
            assert row["topk_differs_share"] == 0.0
    where = report["where_time_goes"]
    assert where["loop thread (the calls), CPU"] > 0  # the calls run on the aio loop
    assert where["search total"] >= where["merge + coverage"] >= 0
