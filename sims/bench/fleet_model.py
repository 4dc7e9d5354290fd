"""`fedretrieve bench fleet-model --json FLEET.json`: the fleet benchmark extrapolated.

One machine cannot show a real fleet's tail: in `bench fleet` a thousand sites and the
broker share two cores, so a query's latency is mostly the CPU the whole fleet spends on
it. This model takes what `bench fleet` measured (the broker's and the sites' CPU per
site per query, a single site's own search latency, the injected latency model) and asks
two questions with one Monte Carlo simulation of a query's fan-out:

- *this machine*: calls leave the broker at the pace the shared cores allow
  (max(c, (c + s) / cores) per site). Checked against the measured flat and adaptive runs.
- *a real fleet*: every site, and every regional broker, on its own host; calls leave at
  the broker's own CPU cost c per site; tiers of `levels` brokers, each over about
  n ** (1 / levels) children, each level paying a single site's RPC overhead once more.

The yardstick is issue 19's bar, 2 x a single site's p99. The model also solves for the
per-site broker CPU at which each topology would meet it.

Deliberately simple: the broker's per-site CPU is one number (send, receive and merge
together), sites answer independently, and a region's answer is one more call.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sims.bench.fleet_node import SiteModel


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "fleet-model", help="extrapolate a `bench fleet` report to a fleet of separate hosts"
    )
    p.add_argument("--json", dest="json_in", required=True, help="a `bench fleet` report")
    p.add_argument("--out", help="write the model here (default: beside the report)")
    p.add_argument("--nodes", default="10,100,1000,10000", help="fleet sizes to predict")
    p.add_argument("--queries", type=int, default=2000, help="simulated queries per point")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


@dataclass(frozen=True)
class Costs:
    """Measured per-site costs (milliseconds) and the machine they were measured on."""

    broker_ms_per_site: float  # c: the broker's CPU per site per query
    sites_ms_per_site: float  # s: a site's CPU per query (its gRPC server, search, reply)
    rpc_ms: float  # a single site's p50 minus the injected body: the call's fixed cost
    cores: int


@dataclass(frozen=True)
class Waiting:
    """The broker's wait policy (server/broker/fanout.py AdaptiveWait), and the deadline."""

    min_share: float = 0.0
    factor: float = 0.5
    max_extra_ms: float = 50.0
    deadline_ms: float = 2000.0


def fit_costs(report: dict) -> Costs:
    """Slopes of broker and site CPU per query against fleet size (flat runs), the RPC cost."""
    flat = [r for r in report["runs"] if r["mode"] == "flat"]
    n = np.array([r["nodes"] for r in flat], dtype=float)
    broker = np.polyfit(n, [r["cpu_ms_per_query"] for r in flat], 1)[0]
    sites = np.polyfit(n, [r["sites_cpu_ms_per_query"] for r in flat], 1)[0]
    body = report["site_model"]["body_ms"]
    single = report["single_node"]["no_stragglers"]["p50_ms"]
    return Costs(
        broker_ms_per_site=round(float(broker), 4),
        sites_ms_per_site=round(float(sites), 4),
        rpc_ms=round(max(0.0, single - body), 3),
        cores=int(report["machine"]["cpus"]),
    )


def site_latencies(site: SiteModel, rpc_ms: float, size: tuple, rng) -> np.ndarray:
    """A call's latency at a site: RPC cost + lognormal body, straggler tail (bench fleet)."""
    body = site.body_ms * np.exp(site.sigma * rng.standard_normal(size))
    slow = rng.random(size) < site.straggler_share
    body = np.where(slow, body * rng.uniform(*site.straggler_factor, size), body)
    return rpc_ms + body


def answer_times(arrivals: np.ndarray, sent_ms: float, wait: Waiting) -> tuple[np.ndarray, ...]:
    """(latency, coverage) per query row of call arrival times, under the wait policy.

    The broker sends every call first (done at `sent_ms`), then waits: for every answer up
    to the deadline, or, adaptively, until `min_share` answered plus a bounded extra."""
    ordered = np.sort(arrivals, axis=1)
    n = arrivals.shape[1]
    stop = np.minimum(np.maximum(ordered[:, -1], sent_ms), wait.deadline_ms)
    if wait.min_share > 0:
        quorum = np.maximum(ordered[:, max(0, math.ceil(wait.min_share * n) - 1)], sent_ms)
        extra = np.minimum(wait.max_extra_ms, wait.factor * quorum)
        stop = np.minimum(stop, quorum + extra)
    coverage = (ordered <= stop[:, None]).sum(axis=1) / n
    return stop, coverage


def simulate(
    n: int,
    site: SiteModel,
    costs: Costs,
    wait: Waiting,
    *,
    shared_cores: bool,
    levels: int = 1,
    queries: int = 2000,
    seed: int = 0,
    broker_ms_per_site: float | None = None,
) -> dict:
    """p50/p99 latency and mean coverage of `queries` simulated queries over `n` sites."""
    rng = np.random.default_rng(seed)
    c = costs.broker_ms_per_site if broker_ms_per_site is None else broker_ms_per_site
    pace = max(c, (c + costs.sites_ms_per_site) / costs.cores) if shared_cores else c

    def level(sites: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(answer time, share of its sites answered) per query of a broker over `sites`."""
        if depth == 1:
            lat = site_latencies(site, costs.rpc_ms, (queries, sites), rng)
            share, weight = np.ones_like(lat), np.ones(sites)
        else:
            fan = max(2, round(sites ** (1.0 / depth)))
            weight = np.array([sites // fan + (i < sites % fan) for i in range(fan)], float)
            parts = [level(int(size), depth - 1) for size in weight]
            lat = np.stack([p[0] for p in parts], axis=1) + costs.rpc_ms  # one more hop
            share = np.stack([p[1] for p in parts], axis=1)
        arrivals = lat + pace * np.arange(1, lat.shape[1] + 1)
        stop, _ = answer_times(arrivals, pace * lat.shape[1], wait)
        answered = arrivals <= stop[:, None]
        return stop, (answered * share * weight).sum(axis=1) / weight.sum()

    latency, coverage = level(n, levels)
    return {
        "p50_ms": round(float(np.percentile(latency, 50)), 2),
        "p99_ms": round(float(np.percentile(latency, 99)), 2),
        "coverage_mean": round(float(coverage.mean()), 4),
    }


def cpu_for_bar(n: int, site: SiteModel, costs: Costs, wait: Waiting, bar_ms: float,
                levels: int, queries: int) -> float | None:  # fmt: skip
    """The largest per-site broker CPU (ms) at which p99 stays within `bar_ms` (bisection);
    None if even a free broker would not (the sites' own tail is above the bar)."""

    def p99(c: float) -> float:
        point = simulate(n, site, costs, wait, shared_cores=False, levels=levels,
                         queries=queries, broker_ms_per_site=c)  # fmt: skip
        return point["p99_ms"]

    if p99(0.0) > bar_ms:
        return None
    low, high = 0.0, max(costs.broker_ms_per_site, 1e-3)
    while p99(high) <= bar_ms and high < 100:
        low, high = high, high * 2
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if p99(mid) <= bar_ms else (low, mid)
    return round(low, 4)


def model_report(report: dict, sizes: list[int], queries: int = 2000, seed: int = 0) -> dict:
    """Validation against the measured runs, predictions for a fleet, the CPU the bar needs."""
    costs = fit_costs(report)
    model = report["site_model"]
    site = SiteModel(**{**model, "straggler_factor": tuple(model["straggler_factor"])})
    tail = report.get("tail", {})
    adaptive = Waiting(
        min_share=tail.get("adaptive_min_coverage", 0.99),
        factor=tail.get("adaptive_wait_factor", 0.5),
        max_extra_ms=tail.get("adaptive_max_extra_ms", 50.0),
    )
    flat = Waiting()
    validation = []
    for run in report["runs"]:
        if run["mode"] == "tiered":
            continue  # tiers on one machine: every level shares the same two cores
        s = SiteModel(**{**asdict(site), "straggler_share": run["stragglers"]})
        got = simulate(run["nodes"], s, costs, adaptive if run["mode"] == "adaptive" else flat,
                       shared_cores=True, queries=queries, seed=seed)  # fmt: skip
        validation.append({
            "nodes": run["nodes"], "stragglers": run["stragglers"], "mode": run["mode"],
            "measured_p50_ms": run["p50_ms"], "model_p50_ms": got["p50_ms"],
            "measured_p99_ms": run["p99_ms"], "model_p99_ms": got["p99_ms"],
        })  # fmt: skip
    bar = 2 * report["single_node"]["p99_ms"]
    fleet, needed = [], []
    for n in sizes:
        for mode, levels in (("flat", 1), ("adaptive", 1), ("tiered", 2), ("tiered", 3)):
            if levels > 1 and n ** (1 / levels) < 2:
                continue
            wait = flat if mode == "flat" else adaptive
            got = simulate(n, site, costs, wait, shared_cores=False, levels=levels,
                           queries=queries, seed=seed)  # fmt: skip
            fleet.append({"nodes": n, "stragglers": site.straggler_share, "mode": mode,
                          "levels": levels, **got, "within_bar": got["p99_ms"] <= bar})  # fmt: skip
            if mode == "flat" or n < 1000:
                continue
            # each level's quorum: a broker over 32 children at 99% waits for all 32, so one
            # straggler anywhere holds up its region; 99% coverage on average allows less
            for quorum in sorted({adaptive.min_share, 0.98, 0.95, 0.9}, reverse=True):
                policy = replace(wait, min_share=quorum)
                c = cpu_for_bar(n, site, costs, policy, bar, levels, min(queries, 1000))
                at = simulate(n, site, costs, policy, shared_cores=False, levels=levels,
                              queries=queries, seed=seed, broker_ms_per_site=c or 0.0)  # fmt: skip
                needed.append({"nodes": n, "mode": mode, "levels": levels, "min_share": quorum,
                               "broker_ms_per_site_for_bar": c, "then": at})  # fmt: skip
    return {
        "source": report.get("command", ""),
        "costs": asdict(costs),
        "bar_ms": round(bar, 2),
        "validation_this_machine": validation,
        "fleet_separate_hosts": fleet,
        "broker_cpu_for_bar": needed,
        "note": __doc__.split("\n\n")[1].replace("\n", " ").strip(),
    }


def main(args: argparse.Namespace) -> int:
    source = Path(args.json_in)
    report = json.loads(source.read_text())
    sizes = sorted({int(n) for n in args.nodes.split(",")})
    result = model_report(report, sizes, queries=args.queries, seed=args.seed)
    out = Path(args.out) if args.out else source.with_name(source.stem + "-model.json")
    out.write_text(json.dumps(result, indent=2))
    c = result["costs"]
    print(
        f"costs: broker {c['broker_ms_per_site']} ms/site, sites {c['sites_ms_per_site']} "
        f"ms/site, rpc {c['rpc_ms']} ms, {c['cores']} cores; bar {result['bar_ms']} ms"
    )
    for v in result["validation_this_machine"]:
        print(f"  measured vs model {v['nodes']:>5} {v['mode']:<8} s={v['stragglers']}: p50 "
              f"{v['measured_p50_ms']:.1f}/{v['model_p50_ms']:.1f} p99 "
              f"{v['measured_p99_ms']:.1f}/{v['model_p99_ms']:.1f}")  # fmt: skip
    for f in result["fleet_separate_hosts"]:
        print(f"  fleet {f['nodes']:>5} {f['mode']:<8} levels {f['levels']}: p50 {f['p50_ms']:.1f} "
              f"p99 {f['p99_ms']:.1f} coverage {f['coverage_mean']:.4f}"
              f"{'  within bar' if f['within_bar'] else ''}")  # fmt: skip
    for b in result["broker_cpu_for_bar"]:
        print(
            f"  bar at {b['nodes']} sites, {b['mode']} x{b['levels']} quorum {b['min_share']}: "
            f"broker CPU <= {b['broker_ms_per_site_for_bar']} ms/site, then {b['then']}"
        )
    print(f"wrote {out}")
    return 0
