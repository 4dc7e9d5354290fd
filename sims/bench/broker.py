"""`fedretrieve bench broker --json OUT`: what the broker costs, and what embedding once saves.

Setup: N real node daemons (separate processes, `edge_node.serving.daemon.create_server`) on
loopback, each with a gallery of `--vectors` catalogued images, and brokers in this
process. Embedding 10k images per node with the real image tower would take most of the
run on a 2-core machine, so each node's index is filled with random L2-normalised vectors
under the node's real model version (the catalog still holds one tiny image per vector, so
hits resolve exactly as in production). Text encoding is real: the `default` model's
MiniLM text tower, on the broker or on the nodes.

Measured, per node count (1, 4, 8 by default; the same processes, selected by node id):
- latency p50/p99 of a query through the broker (broker embeds; nodes only search) and
  through a broker without a model (every node encodes the text itself);
- latency of direct calls to each node with the same queries, text (node encodes) and
  vector (search only); the slowest node's figures and the broker/direct ratios;
- node CPU time per query (sum over the selected nodes, from /proc) in both modes.

Node data dirs are kept under `--work` and reused by later runs (ingest is the slow part).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from sims.bench.workload import percentiles, sample_captions
from sims.node_process import run_json_child, start_node_processes, write_node_config

MODES = ("broker_embeds", "node_encodes")  # who encodes the query text


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("broker", help="broker latency vs direct node calls; CPU")
    p.add_argument("--json", dest="json_out", required=True, help="write the figures here")
    p.add_argument("--nodes", default="1,4,8", help="node counts to measure (comma list)")
    p.add_argument("--vectors", type=int, default=10_000, help="gallery vectors per node")
    p.add_argument("--queries", type=int, default=100, help="timed queries per measurement")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--model", default="default", help="model spec on broker and nodes")
    p.add_argument("--work", default="runs/bench_broker", help="node data dirs (reused)")
    p.set_defaults(func=main)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- node processes
def prepare_node(config_path: str, vectors: int, seed: int) -> dict:
    """Child process: fill a node's gallery and index (random unit vectors under the
    model's real version), save, exit; the daemon then serves what is on disk."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from PIL import Image

    from edge_node.config import load_node_config
    from edge_node.serving.gallery import Gallery, IngestItem
    from edge_node.serving.indexer import normalise
    from edge_node.serving.node import Node

    t0 = time.perf_counter()
    config = load_node_config(Path(config_path))
    rng = np.random.default_rng(seed)
    gallery = Gallery(config.data_dir / "gallery", config.limits)
    for start in range(len(gallery), vectors, 256):
        items = []
        for i in range(start, min(start + 256, vectors)):
            buf = io.BytesIO()
            pixels = rng.integers(0, 255, size=(16, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, format="PNG")
            camera = f"{config.node_id}-cam{i % 4}"
            items.append(IngestItem(buf.getvalue(), camera, 1_700_000_000_000 + i))
        gallery.ingest(items)
    gallery.close()
    node = Node.open(config)
    gen = node.active
    missing = np.setdiff1d(node.gallery.ids(), gen.index.id_array())
    if len(missing):
        fill = normalise(
            rng.standard_normal((len(missing), gen.backend.embed_dim)).astype("float32")
        )
        gen.index.add(missing.astype(np.int64), fill)
        node.save_index()
    node.close()
    return {"prepare_s": round(time.perf_counter() - t0, 1)}


def start_nodes(count: int, work: Path, vectors: int, model: str) -> list[dict]:
    """`count` real node daemons on loopback, without tokens, each serving `vectors`."""
    files, prepared = [], []
    for i in range(count):
        node_id = f"bench-node-{i}"
        f = write_node_config(
            work / node_id,
            node_id,
            model=model,
            with_token=False,
            adapter_dir="",
            torch_threads=1,
            grace_s=1.0,
            sections={
                "index": {"save-interval-s": 3600.0},
                "limits": {"max-k": 100, "grpc-workers": 4},
            },
        )
        args = ["_prepare", str(f.config_path), str(vectors), str(i)]
        prepared.append(run_json_child("sims.bench.broker", args, timeout_s=1800, omp_threads=1))
        files.append(f)
    procs = start_node_processes(files, ready_timeout_s=300)
    return [
        {"id": p.node_id, "port": int(p.address.rpartition(":")[2]), "pid": p.proc.pid,
         "process": p, **ready}
        for p, ready in zip(procs, prepared, strict=True)
    ]  # fmt: skip


def stop_nodes(nodes: list[dict]) -> None:
    for node in nodes:
        node["process"].stop(timeout_s=30)


# ---------------------------------------------------------------- measurement
def main(args: argparse.Namespace) -> int:
    import grpc
    import torch

    from common.factory import create_model
    from protos import broker_pb2, node_pb2, node_pb2_grpc, retrieval_pb2
    from server.broker.config import BrokerConfig, NodeEntry
    from server.broker.daemon import create_server, stop_server

    torch.set_num_threads(1)
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews latency
    counts = sorted({int(c) for c in str(args.nodes).split(",")})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"starting {max(counts)} node processes ({args.vectors} vectors each) ...", flush=True)
    t0 = time.perf_counter()
    nodes = start_nodes(max(counts), work, args.vectors, args.model)
    startup_s = time.perf_counter() - t0
    model = create_model(args.model)
    queries = sample_captions(args.queries)
    vectors = {q: model.encode_text([q])[0].tolist() for q in queries}
    config = BrokerConfig(
        nodes=tuple(NodeEntry(id=n["id"], address=f"127.0.0.1:{n['port']}") for n in nodes),
        listen="127.0.0.1:0",
        allow_unauthenticated=True,
        default_deadline_ms=20_000,
        health_interval_s=60.0,
    )
    brokers = {}
    try:
        for mode, encoder in (("broker_embeds", model), ("node_encodes", None)):
            server, port, broker = create_server(config, encoder=encoder, health_checks=False)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            brokers[mode] = (server, broker, channel, broker_pb2_grpc_stub(channel))

        def broker_call(mode: str, q: str, node_ids: list[str]) -> float:
            request = broker_pb2.BrokerSearchRequest(text=q, k=args.k, node_ids=node_ids)
            t = time.perf_counter()
            reply = brokers[mode][3].Search(request)
            took = (time.perf_counter() - t) * 1000
            if not reply.coverage.full:
                raise RuntimeError(f"incomplete coverage in the benchmark: {reply.coverage}")
            return took

        def direct_call(node_id: str, kind: str, q: str) -> float:
            request = node_pb2.SearchRequest(text=q, k=args.k)
            if kind == "vector":
                request.vector.CopyFrom(
                    retrieval_pb2.QueryVector(values=vectors[q], model_version=model.version)
                )
            t = time.perf_counter()
            node_stubs[node_id].Search(request)
            return (time.perf_counter() - t) * 1000

        node_channels = {n["id"]: grpc.insecure_channel(f"127.0.0.1:{n['port']}") for n in nodes}
        node_stubs = {i: node_pb2_grpc.NodeServiceStub(c) for i, c in node_channels.items()}
        results = []
        for count in counts:
            ids = [n["id"] for n in nodes[:count]]
            pids = [n["pid"] for n in nodes[:count]]
            row: dict = {"nodes": count, "vectors_total": count * args.vectors}
            # latency: every series interleaved query by query, so load drift hits all alike
            series: dict[str, list[float]] = {}
            for i, q in enumerate([*queries[:5], *queries]):
                timings = {mode: broker_call(mode, q, ids) for mode in MODES}
                for node_id in ids:
                    for kind in ("text", "vector"):
                        timings[f"{node_id}/{kind}"] = direct_call(node_id, kind, q)
                if i >= 5:  # the first five warm up caches and connections
                    for name, ms in timings.items():
                        series.setdefault(name, []).append(ms)
            # node CPU per query: one mode at a time, from the nodes' /proc counters
            for mode in MODES:
                cpu0, own0 = sum(cpu_seconds(p) for p in pids), time.process_time()
                for q in queries:
                    broker_call(mode, q, ids)
                node_cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / len(queries) * 1000
                own_cpu = (time.process_time() - own0) / len(queries) * 1000
                row[mode] = {
                    **percentiles(series[mode]),
                    "node_cpu_ms_per_query": round(node_cpu, 2),
                    "broker_process_cpu_ms_per_query": round(own_cpu, 2),
                }
            row["direct_per_node"] = {
                f"{node_id}/{kind}": percentiles(series[f"{node_id}/{kind}"])
                for node_id in ids
                for kind in ("text", "vector")
            }
            for kind in ("text", "vector"):
                slowest = max(
                    ids, key=lambda i, kind=kind: row["direct_per_node"][f"{i}/{kind}"]["p50_ms"]
                )
                row[f"direct_slowest_{kind}"] = {
                    "node": slowest,
                    **row["direct_per_node"][f"{slowest}/{kind}"],
                }
                base = row[f"direct_slowest_{kind}"]
                row[f"ratio_broker_embeds_vs_direct_{kind}"] = {
                    "p50": round(row["broker_embeds"]["p50_ms"] / base["p50_ms"], 2),
                    "p99": round(row["broker_embeds"]["p99_ms"] / base["p99_ms"], 2),
                }
            row["load_average_1m"] = round(os.getloadavg()[0], 2)
            results.append(row)
            print_row(row)
        for channel in node_channels.values():
            channel.close()
    finally:
        for server, broker, channel, _stub in brokers.values():
            channel.close()
            stop_server(server, broker, grace=None)
        stop_nodes(nodes)

    report = {
        "command": (
            f"fedretrieve bench broker --json {args.json_out} --nodes {args.nodes} "
            f"--vectors {args.vectors} --queries {args.queries} -k {args.k} --model {args.model}"
        ),
        "setup": {
            "model": args.model,
            "model_version": model.version,
            "vectors_per_node": args.vectors,
            "queries": args.queries,
            "k": args.k,
            "cpu_cores": os.cpu_count(),
            "node_startup_s": round(startup_s, 1),
            "node_prepare_s": {n["id"]: n["prepare_s"] for n in nodes},
            "load_average_1m_at_start": load_at_start,
            "note": (
                "node indexes filled with random L2-normalised vectors (catalog rows are real, "
                "one tiny image each); text encoding is real; every process on one machine; "
                "queries sequential, one at a time"
            ),
        },
        "results": results,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def broker_pb2_grpc_stub(channel):
    from protos import broker_pb2_grpc

    return broker_pb2_grpc.BrokerServiceStub(channel)


def print_row(row: dict) -> None:
    be, ne = row["broker_embeds"], row["node_encodes"]
    dt, dv = row["direct_slowest_text"], row["direct_slowest_vector"]
    print(
        f"{row['nodes']} nodes: broker(embeds) p50 {be['p50_ms']:.1f} p99 {be['p99_ms']:.1f} ms | "
        f"broker(nodes encode) p50 {ne['p50_ms']:.1f} p99 {ne['p99_ms']:.1f} | "
        f"direct slowest text p50 {dt['p50_ms']:.1f} p99 {dt['p99_ms']:.1f}, "
        f"vector p50 {dv['p50_ms']:.1f} p99 {dv['p99_ms']:.1f} | "
        f"node CPU/query {be['node_cpu_ms_per_query']:.1f} vs {ne['node_cpu_ms_per_query']:.1f} ms",
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_prepare":
        print(json.dumps(prepare_node(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        sys.exit(0)
    parser = argparse.ArgumentParser(prog="python -m sims.bench.broker")
    register_bench(parser.add_subparsers(dest="bench", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
