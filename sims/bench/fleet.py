"""`fedretrieve bench fleet --nodes 10,100,1000 --json OUT`: the broker's tail at fleet scale.

Sites are real NodeService servers on loopback, many per host process
(`sims.bench.fleet_node`: a faiss shard each, an explicit latency and failure model). The
broker is the real one (`server.broker.daemon.create_server`, in this process, health
checks off), queried over gRPC one query at a time. For each fleet size, with and without
stragglers, it measures three ways of answering:

- `flat`: wait for every site until the deadline (today's default);
- `adaptive`: `[tail] adaptive-min-coverage` (answer once that share answered, plus a
  bounded extra wait), with `topk-probability` asking each site for k' < k hits;
- `tiered`: regional brokers over groups of sites, a top broker over the regions
  (server/broker/tier.py), each level with the adaptive settings.

Per run: client-observed p50/p99, coverage (share of sites answered), the share of queries
whose top-k differs from the exact top-k over every site's shard (rebuilt here from the
same seeds), bytes per query on the sites' side, and CPU per query of the broker (this
process) and of the sites (their host processes). A single site's own search latency under
the same model is the yardstick (`single_node`). At the largest size the broker's time is
split into its phases with cProfile (where the time goes).

Every process runs on this machine, so site CPU and broker CPU compete for the same cores:
state the load average (recorded) and read the figures as an upper bound of the broker's
cost, not a prediction of a real fleet's latency.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from sims.bench.fleet_node import MODEL_VERSION, SiteModel, host_args, shard, site_id
from sims.bench.workload import percentiles
from sims.node_process import JsonChild, start_json_child

MODES = ("flat", "adaptive", "tiered")


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("fleet", help="broker tail latency and coverage, 10-1000 sites")
    p.add_argument("--json", dest="json_out", required=True, help="write the figures here")
    p.add_argument("--nodes", default="10,100,1000", help="fleet sizes (comma list)")
    p.add_argument("--queries", type=int, default=100, help="timed queries per run")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--vectors", type=int, default=100, help="gallery vectors per site")
    p.add_argument("--dim", type=int, default=256, help="embedding dimension")
    p.add_argument("--body-ms", type=float, default=1.0, help="median injected delay per call")
    p.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of the delay")
    p.add_argument("--straggler-share", type=float, default=0.01)
    p.add_argument("--straggler-factor", default="10,50", help="slow-down range of a straggler")
    p.add_argument("--down-share", type=float, default=0.0, help="sites with nothing listening")
    p.add_argument("--hanging-share", type=float, default=0.0, help="sites that never answer")
    p.add_argument("--flapping-share", type=float, default=0.0)
    p.add_argument("--sites-per-host", type=int, default=250)
    p.add_argument("--host-threads", type=int, default=32)
    p.add_argument("--deadline-ms", type=int, default=2000)
    p.add_argument("--adaptive-min-coverage", type=float, default=0.99)
    p.add_argument("--adaptive-wait-factor", type=float, default=0.5)
    p.add_argument("--adaptive-max-extra-ms", type=int, default=50)
    p.add_argument("--topk-probability", type=float, default=0.99)
    p.add_argument("--modes", default=",".join(MODES), help="flat,adaptive,tiered")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


class QueryEncoder:
    """The broker's 'model': each query text names a seeded random unit vector."""

    version = MODEL_VERSION

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


def query_vectors(n: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((seed, 99))
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return {f"q{i:04d}": x[i] for i in range(n)}


def exact_topk(model: SiteModel, sites: int, queries: dict[str, np.ndarray], k: int) -> dict:
    """(site id, image id) of the true top-k over every site's shard, per query."""
    union = np.concatenate([shard(model, s) for s in range(sites)])
    owner = np.repeat(np.arange(sites), model.vectors)
    names = list(queries)
    scores = np.stack([queries[q] for q in names]) @ union.T
    top = np.argsort(-scores, axis=1)[:, :k]
    return {q: [(site_id(int(owner[j])), int(j)) for j in top[i]] for i, q in enumerate(names)}


def start_hosts(model: SiteModel, sites: int, per_host: int, threads: int) -> list[JsonChild]:
    hosts = []
    for first in range(0, sites, per_host):
        count = min(per_host, sites - first)
        args = host_args(model, first, count, threads)
        hosts.append(
            start_json_child("sims.bench.fleet_node", args, ready_timeout_s=300, omp_threads=1)
        )
    return hosts


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(args: argparse.Namespace) -> int:
    import grpc

    from protos import broker_pb2, broker_pb2_grpc, node_pb2, node_pb2_grpc, retrieval_pb2
    from server.broker.config import BrokerConfig, NodeEntry, TailSettings
    from server.broker.daemon import create_server, stop_server
    from server.broker.tier import start_tier

    logging.getLogger("server.broker").setLevel(logging.WARNING)  # one line per query otherwise
    sizes = sorted({int(n) for n in args.nodes.split(",")})
    modes = [m for m in args.modes.split(",") if m]
    low, high = (float(x) for x in args.straggler_factor.split(","))
    model = SiteModel(
        vectors=args.vectors, dim=args.dim, body_ms=args.body_ms, sigma=args.sigma,
        straggler_share=args.straggler_share, straggler_factor=(low, high),
        down_share=args.down_share, hanging_share=args.hanging_share,
        flapping_share=args.flapping_share, seed=args.seed,
    )  # fmt: skip
    queries = query_vectors(args.queries + 5, args.dim, args.seed)
    names = list(queries)
    encoder = QueryEncoder(queries)
    adaptive_tail = TailSettings(
        adaptive_min_coverage=args.adaptive_min_coverage,
        adaptive_wait_factor=args.adaptive_wait_factor,
        adaptive_max_extra_ms=args.adaptive_max_extra_ms,
        topk_probability=args.topk_probability,
    )
    report: dict = {
        "command": _command(args),
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_start": os.getloadavg()[0]},
        "site_model": {**model.__dict__, "straggler_factor": list(model.straggler_factor)},
        "note": __doc__.split("\n\n")[-1].replace("\n", " ").strip(),
        "runs": [],
    }
    with ExitStack() as stack:
        t0 = time.perf_counter()
        hosts = start_hosts(model, max(sizes), args.sites_per_host, args.host_threads)
        stack.callback(lambda: [h.stop() for h in hosts])
        ports = [p for h in hosts for p in h.ready["ports"]]
        roles = {k: v for h in hosts for k, v in h.ready["roles"].items()}
        report["startup_s"] = round(time.perf_counter() - t0, 1)
        print(f"{len(ports)} sites on {len(hosts)} host processes", flush=True)

        def set_stragglers(share: float) -> None:
            for h in hosts:
                h.ask("latency " + json.dumps({"straggler_share": share}))

        def host_stats() -> dict:
            out = {"bytes": 0, "cpu_s": 0.0}
            for h in hosts:
                s = h.ask("stats")
                out["bytes"] += s["bytes_in"] + s["bytes_out"]
                out["cpu_s"] += cpu_seconds(h.ready["pid"])
            return out

        # the yardstick: one site's own search, through its own port
        single = {}
        for label, share in (("no_stragglers", 0.0), ("stragglers", model.straggler_share)):
            set_stragglers(share)
            up = next(i for i in range(len(ports)) if roles[site_id(i)] == "ok")
            with grpc.insecure_channel(f"127.0.0.1:{ports[up]}") as channel:
                stub = node_pb2_grpc.NodeServiceStub(channel)
                ms = []
                for i, q in enumerate(names * 3):
                    vector = retrieval_pb2.QueryVector(
                        values=queries[q].tolist(), model_version=MODEL_VERSION
                    )
                    t = time.perf_counter()
                    stub.Search(node_pb2.SearchRequest(vector=vector, k=args.k), timeout=10)
                    if i >= 5:
                        ms.append((time.perf_counter() - t) * 1000.0)
            single[label] = percentiles(ms)
        report["single_node"] = {**single["stragglers"], "no_stragglers": single["no_stragglers"]}

        def broker_config(entries, tail):
            return BrokerConfig(
                nodes=tuple(entries), listen="127.0.0.1:0", allow_unauthenticated=True,
                default_deadline_ms=args.deadline_ms, max_deadline_ms=args.deadline_ms,
                max_k=max(args.k, 100), health_interval_s=3600.0, workers=4, tail=tail,
                retry_max_attempts=1,
            )  # fmt: skip

        for n in sizes:
            entries = [NodeEntry(id=site_id(i), address=f"127.0.0.1:{ports[i]}") for i in range(n)]
            exact = exact_topk(model, n, queries, args.k)
            for share in sorted({0.0, model.straggler_share}):
                set_stragglers(share)
                for mode in modes:
                    with ExitStack() as run:
                        if mode == "tiered":
                            regions = max(2, round(n**0.5))
                            top_config, closers = start_tier(
                                entries, regions, lambda e: broker_config(e, adaptive_tail),
                                encoder,
                            )  # fmt: skip
                            for close in closers:
                                run.callback(close)
                            config = top_config
                        else:
                            tail = adaptive_tail if mode == "adaptive" else TailSettings()
                            config = broker_config(entries, tail)
                        server, port, broker = create_server(
                            config, encoder=encoder, health_checks=False
                        )
                        run.callback(lambda s=server, b=broker: stop_server(s, b, grace=None))
                        channel = run.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}"))
                        stub = broker_pb2_grpc.BrokerServiceStub(channel)
                        row = _run(stub, broker_pb2, names, exact, args, host_stats, n, share, mode)
                        if n == max(sizes) and mode == "flat" and share == 0.0:
                            report["where_time_goes"] = _profile(broker, broker_pb2, names, args)
                    report["runs"].append(row)
                    print(_line(row), flush=True)
    report["model"] = _linear_model(report["runs"])
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _run(stub, broker_pb2, names, exact, args, host_stats, n, share, mode) -> dict:
    latencies, coverage, differs = [], [], 0
    cpu0, sites0 = time.process_time(), host_stats()
    for i, q in enumerate(names):
        request = broker_pb2.BrokerSearchRequest(text=q, k=args.k)
        t = time.perf_counter()
        response = stub.Search(request, timeout=args.deadline_ms / 1000.0 + 10)
        took = (time.perf_counter() - t) * 1000.0
        if i < 5:  # warm-up: connections, caches
            cpu0, sites0 = time.process_time(), host_stats()
            continue
        latencies.append(took)
        cov = response.coverage
        coverage.append(cov.nodes_answered / max(1, cov.nodes_total))
        got = [(h.node_id.rsplit("/", 1)[-1], h.image_id) for h in response.hits]
        differs += got != exact[q]
    timed = len(latencies)
    sites1 = host_stats()
    return {
        "nodes": n,
        "stragglers": share,
        "mode": mode,
        **{k: v for k, v in percentiles(latencies).items() if k in ("p50_ms", "p99_ms")},
        "coverage_mean": round(float(np.mean(coverage)), 4),
        "topk_differs_share": round(differs / timed, 4),
        "bytes_per_query": round((sites1["bytes"] - sites0["bytes"]) / timed),
        "cpu_ms_per_query": round((time.process_time() - cpu0) / timed * 1000.0, 2),
        "sites_cpu_ms_per_query": round((sites1["cpu_s"] - sites0["cpu_s"]) / timed * 1000.0, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _profile(broker, broker_pb2, names, args) -> dict:
    """Broker.search in this process under cProfile: milliseconds per query by phase."""
    profiler = cProfile.Profile()
    sample = names[5:25]
    cpu0, thread0 = time.process_time(), time.thread_time()
    profiler.enable()
    for q in sample:
        broker.search(broker_pb2.BrokerSearchRequest(text=q, k=args.k))
    profiler.disable()
    loop_s = (time.process_time() - cpu0) - (time.thread_time() - thread0)
    stats = pstats.Stats(profiler)
    # the calls themselves (serialisation, gRPC) run on the broker's aio loop thread, which
    # this profile of the calling thread does not see: "loop thread" is the rest of the
    # process's CPU over the same queries
    phases = {
        "per-node requests": ("fanout.py", "node_request"),
        "hand-off to the call loop": ("aio_calls.py", "search"),
        "wait": ("fanout.py", "wait"),
        "collect": ("fanout.py", "collect"),
        "merge + coverage": ("broker.py", "_respond"),
        "embed": ("broker.py", "embed"),
    }
    out = {}
    for label, (file, func) in phases.items():
        total = sum(
            row[3] for key, row in stats.stats.items() if key[2] == func and key[0].endswith(file)
        )
        out[label] = round(total / len(sample) * 1000.0, 2)
    out["loop thread (the calls), CPU"] = round(loop_s / len(sample) * 1000.0, 2)
    out["search total"] = round(
        sum(row[3] for key, row in stats.stats.items() if key[2] == "search")
        / len(sample) * 1000.0, 2,
    )  # fmt: skip
    return out


def _linear_model(runs: list[dict]) -> dict:
    """broker CPU per query = a + b * nodes, fitted on the flat runs without stragglers."""
    points = [(r["nodes"], r["cpu_ms_per_query"]) for r in runs if r["mode"] == "flat"]
    points = [p for p in points if p[0] > 0]
    if len(points) < 2:
        return {}
    x, y = np.array(points, dtype=float).T
    b, a = np.polyfit(x, y, 1)
    return {
        "broker_cpu_ms_per_query": f"{a:.2f} + {b * 1000:.2f} * nodes / 1000",
        "predicted_at_1000": round(a + b * 1000, 1),
        "measured": [
            {"nodes": int(n), "cpu_ms": c, "model_ms": round(a + b * n, 2)} for n, c in points
        ],
    }


def _line(row: dict) -> str:
    return (
        f"{row['nodes']:>5} sites stragglers {row['stragglers']:.2f} {row['mode']:<8} "
        f"p50 {row['p50_ms']:.1f} p99 {row['p99_ms']:.1f} ms coverage {row['coverage_mean']:.3f} "
        f"differs {row['topk_differs_share']:.2f} broker CPU {row['cpu_ms_per_query']:.1f} ms"
    )


def _command(args: argparse.Namespace) -> str:
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("func", "json_out", "bench", "command", "verbose") and v is not None
    )
    return f"fedretrieve bench fleet --json {args.json_out} {flags}"
