"""`fedretrieve bench node --json OUT`: what one edge node costs to query and to feed.

Measured, each configuration in a fresh child process (so resident memory is the node's):
- single-query latency p50/p99 of Search over gRPC on loopback, one query at a time, for
  text queries (the node encodes the text) and vector queries (the broker's path: search
  only), on galleries of 10k and 100k vectors, for the `default` model and a CLIP
  ViT-B/16-sized model built from config (`clip-b16`, random init: same cost, no weights);
- ingest throughput: realistic 128x64 JPEG crops sent through Ingest in batches of 32,
  images/s until acknowledged (validated, stored, catalogued) and until searchable
  (embedded by the background worker with the default model's image tower);
- resident memory (VmRSS now, VmHWM peak) of the node process.

Not embedded for real: a 10k/100k gallery. The catalog holds one tiny PNG per vector
(written through the normal ingest path) and the index is filled with random
L2-normalised vectors of the model's dimension under the model's real version, so search
cost, filters and hit resolution are those of production; embedding 100k images with the
image tower would take hours on a 2-core machine and says nothing about search latency.
Galleries and indexes are kept under `--work` and reused by later runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from sims.bench.workload import percentiles, sample_captions
from sims.node_process import run_json_child


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("node", help="node search latency, ingest rate, memory")
    p.add_argument("--json", dest="json_out", required=True, help="write the figures here")
    p.add_argument("--models", default="default,clip-b16", help="model specs (comma list)")
    p.add_argument("--sizes", default="10000,100000", help="gallery sizes (comma list)")
    p.add_argument("--index-types", default="flat", help="flat,hnsw,ivf (comma list)")
    p.add_argument("--queries", type=int, default=200, help="timed queries per mode")
    p.add_argument("--ingest-images", type=int, default=256, help="images for the ingest run")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--faiss-threads", type=int, default=1, help="faiss OpenMP threads")
    p.add_argument("--work", default="runs/bench_node", help="galleries and indexes (reused)")
    p.set_defaults(func=main)


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {
        "rss_mb": fields.get("VmRSS", 0.0),
        "peak_rss_mb": fields.get("VmHWM", 0.0),
        "loadavg_1m": round(os.getloadavg()[0], 1),  # other work on the machine, if any
    }


def _set_threads(args: argparse.Namespace) -> None:
    """As `fedretrieve node serve` does with torch-threads and faiss-threads."""
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.faiss_threads)


def _config(data_dir: Path, model: str, index_type: str = "flat"):
    from edge_node.config import IndexSettings, Limits, NodeConfig

    return NodeConfig(
        node_id="bench-node",
        data_dir=data_dir,
        listen="127.0.0.1:0",
        model=model,
        grace_s=1.0,
        index=IndexSettings(type=index_type, save_interval_s=3600.0),
        limits=Limits(max_k=100, max_ingest_batch=512),
    )


def fill_gallery(gallery_dir: Path, size: int) -> float:
    """Catalog `size` tiny images through the normal ingest path (reused when present)."""
    from PIL import Image

    from edge_node.config import Limits
    from edge_node.serving.gallery import Gallery, IngestItem

    t0 = time.perf_counter()
    gallery = Gallery(gallery_dir, Limits(max_ingest_batch=512))
    rng = np.random.default_rng(size)
    for start in range(len(gallery), size, 512):
        items = []
        for i in range(start, min(start + 512, size)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 8, 3), dtype=np.uint8)).save(buf, "PNG")
            items.append(IngestItem(buf.getvalue(), f"cam{i % 8}", 1_700_000_000_000 + i * 1000))
        gallery.ingest(items)
    gallery.close()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- child: search
def run_search(args: argparse.Namespace) -> dict:
    import grpc

    from edge_node.serving.daemon import create_server, shutdown
    from edge_node.serving.indexer import normalise
    from edge_node.serving.node import Node
    from protos import node_pb2, node_pb2_grpc, retrieval_pb2

    _set_threads(args)
    work = Path(args.work)
    gallery_dir = work / f"gallery-{args.size}"
    fill_s = fill_gallery(gallery_dir, args.size)
    data_dir = work / f"node-{args.model}-{args.size}-{args.index}"
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "gallery").exists():
        (data_dir / "gallery").symlink_to(gallery_dir.resolve())
    config = _config(data_dir, args.model, args.index)
    t0 = time.perf_counter()
    node = Node.open(config)
    load_s = time.perf_counter() - t0
    gen = node.active
    missing = np.setdiff1d(node.gallery.ids(), gen.index.id_array())
    t0 = time.perf_counter()
    if len(missing):
        rng = np.random.default_rng(1)
        for start in range(0, len(missing), 10_000):
            chunk = missing[start : start + 10_000]
            vectors = normalise(rng.standard_normal((len(chunk), gen.backend.embed_dim)))
            gen.index.add(chunk.astype(np.int64), vectors)
        node.save_index()
    index_s = time.perf_counter() - t0
    server, port, node = create_server(config, node=node)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = node_pb2_grpc.NodeServiceStub(channel)
    texts = sample_captions(args.queries + 10)
    vectors = gen.backend.encode_text(texts)
    result: dict = {
        "model": args.model,
        "model_version": gen.version,
        "embed_dim": gen.backend.embed_dim,
        "gallery": args.size,
        "index": gen.index.kind,
        "k": args.k,
        "prepare_s": {
            "gallery": round(fill_s, 1),
            "model": round(load_s, 1),
            "index": round(index_s, 1),
        },
    }
    for mode in ("text", "vector"):
        client_ms, node_ms = [], []
        for i, text in enumerate(texts):
            if mode == "text":
                request = node_pb2.SearchRequest(text=text, k=args.k)
            else:
                qv = retrieval_pb2.QueryVector(
                    values=vectors[i].tolist(), model_version=gen.version
                )
                request = node_pb2.SearchRequest(vector=qv, k=args.k)
            t = time.perf_counter()
            reply = stub.Search(request, timeout=30)
            elapsed = (time.perf_counter() - t) * 1000
            assert reply.used_vector == (mode == "vector") and len(reply.hits) == args.k
            assert reply.vectors_searched == args.size
            if i >= 10:  # the first ten warm up caches and thread pools
                client_ms.append(elapsed)
                node_ms.append(reply.took_ms)
        result[f"{mode}_search"] = {
            "client": percentiles(client_ms),
            "node_took": percentiles(node_ms),
        }
    result["memory"] = memory_mb()
    channel.close()
    shutdown(server, node, 1.0)
    return result


# ---------------------------------------------------------------- child: ingest
def crop(seed: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(60, 200, (128, 64, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(0, 255, 3))
    draw.ellipse([22, 3, 42, 22], fill=(210, 170, 140))
    draw.rectangle([16, 23, 48, 70], fill=colour)
    draw.rectangle([19, 70, 45, 122], fill=tuple(255 - c for c in colour))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def run_ingest(args: argparse.Namespace) -> dict:
    import shutil

    import grpc

    from edge_node.serving.daemon import create_server, shutdown
    from protos import node_pb2, node_pb2_grpc

    _set_threads(args)
    data_dir = Path(args.work) / "ingest-run"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = _config(data_dir, args.model)
    server, port, node = create_server(config)
    server.start()
    stub = node_pb2_grpc.NodeServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    images = [crop(i) for i in range(args.images)]
    batch_ms = []
    t0 = time.perf_counter()
    for start in range(0, len(images), 32):
        items = [
            node_pb2.ImageItem(data=d, camera_id=f"cam{(start + j) % 4}", timestamp_ms=start + j)
            for j, d in enumerate(images[start : start + 32])
        ]
        t = time.perf_counter()
        reply = stub.Ingest(node_pb2.IngestRequest(images=items), timeout=60)
        batch_ms.append((time.perf_counter() - t) * 1000)
        assert all(r.accepted for r in reply.results)
    acked_s = time.perf_counter() - t0
    while stub.Status(node_pb2.StatusRequest()).indexed_size < len(images):
        time.sleep(0.01)
    searchable_s = time.perf_counter() - t0
    result = {
        "model": args.model,
        "images": len(images),
        "image_bytes_mean": int(np.mean([len(b) for b in images])),
        "batch": 32,
        "acknowledged_images_per_s": round(len(images) / acked_s, 1),
        "searchable_images_per_s": round(len(images) / searchable_s, 1),
        "ingest_call": percentiles(batch_ms),
        "memory": memory_mb(),
    }
    shutdown(server, node, 1.0)
    shutil.rmtree(data_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------- parent
def _child(kind: str, **options) -> dict:
    """One measurement in a fresh process, so its resident memory is the node's alone."""
    args = [kind] + [item for key, value in options.items() for item in (f"--{key}", str(value))]
    return run_json_child("sims.bench.node", args, timeout_s=3600)


def main(args: argparse.Namespace) -> int:
    common = {"work": args.work, "threads": args.threads, "faiss-threads": args.faiss_threads}
    report: dict = {
        "command": (
            f"fedretrieve bench node --json {args.json_out} --models {args.models} "
            f"--sizes {args.sizes} --index-types {args.index_types} --queries {args.queries} "
            f"--ingest-images {args.ingest_images} -k {args.k} --threads {args.threads} "
            f"--faiss-threads {args.faiss_threads}"
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "threads": {"torch": args.threads, "faiss": args.faiss_threads},
        "note": (
            "galleries are catalogued tiny images with random L2-normalised vectors of the "
            "model's dimension in the index (not embedded); queries are real text, encoded by "
            "the node (text) or beforehand (vector); latency is client-observed over gRPC "
            "on loopback, one query at a time"
        ),
        "search": [],
    }
    for model in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for index_type in args.index_types.split(","):
                print(
                    f"search: {model}, {size} vectors, {index_type} ...",
                    file=sys.stderr,
                    flush=True,
                )
                row = _child(
                    "_search",
                    model=model,
                    size=size,
                    index=index_type,
                    queries=args.queries,
                    k=args.k,
                    **common,
                )
                report["search"].append(row)
                print(_row_line(row), file=sys.stderr, flush=True)
    print(f"ingest: {args.ingest_images} crops ...", file=sys.stderr, flush=True)
    report["ingest"] = _child("_ingest", model="default", images=args.ingest_images, **common)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    ing = report["ingest"]
    print(
        f"ingest: {ing['acknowledged_images_per_s']} images/s acknowledged, "
        f"{ing['searchable_images_per_s']} images/s searchable; wrote {out}",
        file=sys.stderr,
    )
    return 0


def _row_line(row: dict) -> str:
    t, v = row["text_search"]["client"], row["vector_search"]["client"]
    return (
        f"  {row['model']:>9} {row['gallery']:>7} {row['index']:<5} text p50 {t['p50_ms']:.1f} "
        f"p99 {t['p99_ms']:.1f} ms | vector p50 {v['p50_ms']:.1f} p99 {v['p99_ms']:.1f} ms | "
        f"RSS {row['memory']['rss_mb']:.0f} MB"
    )


def _child_main(argv: list[str]) -> int:
    if not argv or not argv[0].startswith("_"):  # `python -m sims.bench.node node --json OUT`
        parser = argparse.ArgumentParser(prog="python -m sims.bench.node")
        register_bench(parser.add_subparsers(dest="bench", required=True))
        args = parser.parse_args(argv)
        return args.func(args)
    parser = argparse.ArgumentParser(prog="python -m sims.bench.node")
    parser.add_argument("kind", choices=["_search", "_ingest"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--index", default="flat")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--faiss-threads", type=int, default=1)
    parser.add_argument("--work", default="runs/bench_node")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = run_search(args) if args.kind == "_search" else run_ingest(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
