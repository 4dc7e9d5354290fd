"""Simulated sites for `fedretrieve bench fleet`: many real NodeService servers per process.

A fleet of a thousand real node daemons (each with a model, a gallery and threads) does
not fit on two cores, and the broker's fan-out does not care what is behind the port: it
sees gRPC calls that take some time and return some hits. So a site here is a real gRPC
server speaking NodeService with a real faiss shard (seeded random unit vectors of the
model's dimension), answering vector queries, with latency and failures drawn from an
explicit model:

- body: the measured faiss search plus a lognormal delay (median `body_ms`, `sigma`);
- tail: with probability `straggler_share` a call takes `straggler_factor` (drawn uniformly
  from the range) times the body;
- failures: a share of sites `down` (nothing listens), `hanging` (never answer before the
  deadline), `flapping` (UNAVAILABLE in alternate windows of `flap_period_s`).

One host process serves many sites on one shared thread pool and reports their ports as
one JSON line; it then answers `stats` on stdin (bytes in and out, calls, CPU seconds) and
`latency {json}` (change the body/tail model for the next run), and exits on EOF. Shards
are a pure function of (seed, site index), so the parent can rebuild
the union and compute the exact top-k for every query.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass, replace

import faiss
import grpc
import numpy as np

from protos import node_pb2, node_pb2_grpc

MODEL_VERSION = "fleet-sim@1"


@dataclass(frozen=True)
class SiteModel:
    vectors: int = 100  # gallery vectors per site
    dim: int = 256  # the default model's embedding dimension
    body_ms: float = 1.0
    sigma: float = 0.5
    straggler_share: float = 0.0
    straggler_factor: tuple[float, float] = (10.0, 50.0)
    down_share: float = 0.0
    hanging_share: float = 0.0
    flapping_share: float = 0.0
    flap_period_s: float = 2.0
    seed: int = 0

    def role(self, site: int) -> str:
        """ok | down | hanging | flapping, fixed per site by the seed."""
        u = np.random.default_rng((self.seed, site, 1)).random()
        for name, share in (
            ("down", self.down_share),
            ("hanging", self.hanging_share),
            ("flapping", self.flapping_share),
        ):
            if u < share:
                return name
            u -= share
        return "ok"


def site_id(site: int) -> str:
    return f"site-{site:04d}"


def shard(model: SiteModel, site: int) -> np.ndarray:
    """Site `site`'s gallery vectors (float32, unit rows): the same in every process."""
    rng = np.random.default_rng((model.seed, site, 0))
    x = rng.standard_normal((model.vectors, model.dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_in = self.bytes_out = self.calls = 0

    def add(self, bytes_in: int, bytes_out: int) -> None:
        with self.lock:
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out
            self.calls += 1


class SiteServicer(node_pb2_grpc.NodeServiceServicer):
    """One simulated site: a faiss shard behind NodeService.Search with injected latency."""

    def __init__(self, model: SiteModel, site: int, counters: Counters, live: dict) -> None:
        self.model, self.site, self.counters = model, site, counters
        self.live = live  # {"model": SiteModel}: the latency model now in force (host-wide)
        self.node_id = site_id(site)
        self.role = model.role(site)
        self.index = faiss.IndexIDMap(faiss.IndexFlatIP(model.dim))
        ids = np.arange(site * model.vectors, (site + 1) * model.vectors, dtype=np.int64)
        self.index.add_with_ids(shard(model, site), ids)
        self._rng = np.random.default_rng((model.seed, site, 2))
        self._rng_lock = threading.Lock()

    def _delay_s(self) -> float:
        m = self.live["model"]
        with self._rng_lock:
            body = m.body_ms * math.exp(m.sigma * self._rng.standard_normal())
            if self._rng.random() < m.straggler_share:
                body *= self._rng.uniform(*m.straggler_factor)
        return body / 1000.0

    def Search(self, request, context):
        t0 = time.perf_counter()
        if self.role == "hanging":
            while context.is_active() and time.perf_counter() - t0 < 60:
                time.sleep(0.01)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "simulated hang")
        if self.role == "flapping" and int(time.time() / self.model.flap_period_s) % 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "simulated flapping site")
        query = np.asarray(request.vector.values, dtype=np.float32).reshape(1, -1)
        scores, ids = self.index.search(query, max(1, request.k))
        response = node_pb2.SearchResponse(
            model_version=MODEL_VERSION,
            gallery_size=self.model.vectors,
            vectors_searched=self.model.vectors,
            used_vector=True,
        )
        for score, image_id in zip(scores[0], ids[0], strict=True):
            if image_id >= 0:
                response.hits.add(
                    node_id=self.node_id,
                    image_id=int(image_id),
                    camera_id=f"{self.node_id}-cam0",
                    score=float(score),
                    model_version=MODEL_VERSION,
                )
        left = self._delay_s() - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        response.took_ms = (time.perf_counter() - t0) * 1000.0
        self.counters.add(request.ByteSize(), response.ByteSize())
        return response

    def Status(self, request, context):
        return node_pb2.StatusResponse(
            node_id=self.node_id,
            gallery_size=self.model.vectors,
            indexed_size=self.model.vectors,
            model_version=MODEL_VERSION,
            index_version=MODEL_VERSION,
            embed_dim=self.model.dim,
            camera_ids=[f"{self.node_id}-cam0"],
        )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host(model: SiteModel, first: int, count: int, threads: int) -> None:
    """Serve sites first..first+count-1 until stdin closes; see the module docstring."""
    faiss.omp_set_num_threads(1)
    pool = futures.ThreadPoolExecutor(max_workers=threads)
    counters = Counters()
    live = {"model": model}
    servers, ports, roles = [], [], {}
    for site in range(first, first + count):
        servicer = SiteServicer(model, site, counters, live)
        roles[servicer.node_id] = servicer.role
        if servicer.role == "down":
            ports.append(_closed_port())
            continue
        server = grpc.server(pool, options=[("grpc.so_reuseport", 0)])
        node_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    print(json.dumps({"ports": ports, "roles": roles, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "latency":  # {"straggler_share": .., ...}: change the latency model
            live["model"] = replace(live["model"], **json.loads(rest))
            print(json.dumps({"ok": True}), flush=True)
        elif command == "stats":
            with counters.lock:
                stats = {
                    "bytes_in": counters.bytes_in,
                    "bytes_out": counters.bytes_out,
                    "calls": counters.calls,
                }
            stats["cpu_s"] = time.process_time()
            print(json.dumps(stats), flush=True)
    for server in servers:
        server.stop(None)


def host_args(model: SiteModel, first: int, count: int, threads: int) -> list[str]:
    """The command-line argument of one host process (a JSON object)."""
    options = {"model": asdict(model), "first": first, "count": count, "threads": threads}
    return [json.dumps(options)]


if __name__ == "__main__":
    options = json.loads(sys.argv[1])
    site_model = SiteModel(
        **{**options["model"], "straggler_factor": tuple(options["model"]["straggler_factor"])}
    )
    host(site_model, options["first"], options["count"], options["threads"])
