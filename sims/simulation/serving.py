"""Serving stage of the simulation: real node daemons and a real broker on loopback.

Each node is a separate `fedretrieve node serve` process with its own TOML file, data dir
and gallery (that node's test images, ingested over the Ingest RPC). The final global
adapter reaches the nodes the way it does in deployment: it is copied atomically into
each node's watched adapter dir and the daemons hot-swap it. Then the test captions (all,
or `max_queries` spread over the split) are sent through the broker, and the metrics of the
merged answers are compared with the offline metrics of the same model on the union
gallery for the same queries.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from common.datasets import Record
from common.errors import Unavailable
from common.metrics import retrieval_metrics
from protos import broker_pb2, node_pb2
from sims.node_process import (
    NodeFiles,
    NodeProcess,
    start_node_processes,
    wait_until,
    write_node_config,
)
from sims.simulation.students import StudentRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSettings:
    deadline_ms: int = 5000
    concurrency: int = 2  # operator queries in flight at once
    max_queries: int = 0  # 0: every test caption
    start_timeout_s: float = 120.0
    swap_timeout_s: float = 180.0
    sheet_queries: int = 3  # queries drawn in the report's contact sheet
    sheet_k: int = 8


@dataclass
class ServingResult:
    queries: int
    latencies_ms: list[float]
    coverage_full: float  # fraction of queries every node answered
    metrics: dict
    offline: dict
    matches_offline: bool
    max_metric_diff: float
    top10_agreement: float  # queries whose broker top-10 equals the offline top-10
    swap_seconds: float
    merge_modes: dict[str, int]
    sheet_queries: list[str]
    # node id -> {model_version, verified, agreement, note} for nodes serving a student
    students: dict[str, dict] = field(default_factory=dict)
    # node id -> the camera normalisation its index was embedded with ("" when off)
    camera_norm: dict[str, str] = field(default_factory=dict)


def node_files(
    node_id: str, root: Path, model: str, max_k: int, camera_norm: bool = False, **keys: object
) -> NodeFiles:
    """The node's config, as the simulation needs it (`keys`: further top-level keys).
    `camera_norm`: `[camera-norm] enabled`, from the first crop of a camera on."""
    sections: dict[str, dict[str, object]] = {
        "index": {"embed-batch-size": 64, "save-interval-s": 5.0},
        "limits": {"max-k": max_k, "max-ingest-batch": 256},
    }
    if camera_norm:
        sections["camera-norm"] = {"enabled": True, "min-images": 1}
    return write_node_config(
        root,
        node_id,
        model=model,
        **keys,
        adapter_poll_s=0.5,
        drop_dir="",
        torch_threads=1,
        grace_s=2.0,
        sections=sections,
    )


def ingest(node: NodeProcess, records: Sequence[Record], root: Path, batch: int = 128) -> int:
    """Send the node its gallery over the Ingest RPC (as a detector pipeline would)."""
    accepted = 0
    for i in range(0, len(records), batch):
        items = [
            node_pb2.ImageItem(
                data=r.image_path.read_bytes(),
                camera_id=r.camera_id,
                timestamp_ms=r.timestamp_ms,
                captions=list(r.captions),
                file_name=gallery_key(r, root),
            )
            for r in records[i : i + batch]
        ]
        reply = node.stub.Ingest(
            node_pb2.IngestRequest(images=items), timeout=120, metadata=node.metadata
        )
        bad = [res.reason for res in reply.results if not res.accepted]
        if bad:
            raise Unavailable(f"node {node.node_id} rejected {len(bad)} images: {bad[0]}")
        accepted += len(items)
    return accepted


def gallery_key(record: Record, root: Path) -> str:
    return _relative(record.image_path, root)


def _relative(path: Path, root: Path) -> str:
    """The name an image is ingested under: its path inside the dataset (unique there)."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def hand_over(adapter: Path, node: NodeProcess) -> None:
    """Copy the global adapter into the node's watched dir: complete, then renamed in."""
    staging = node.adapter_dir / f".{adapter.name}.incoming"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(adapter, staging)
    os.replace(staging, node.adapter_dir / "federated")


def run_serving(
    test_by_node: dict[str, list[Record]],
    data_root: Path,
    base_model: str,
    adapter: Path,
    expected_version: str,
    offline_embeddings,
    out: Path,
    settings: ServingSettings,
    progress: bool = True,
    students: StudentRun | None = None,
    vector_only: bool = True,
    camera_norm: bool = False,
) -> ServingResult:
    """Start the nodes and the broker, swap in the adapter, run the test captions.

    `students`: nodes that serve a distilled student instead (no adapter to swap in), and
    the calibration crops the broker verifies them with before merging their scores."""
    from server.broker.config import BrokerConfig, NodeEntry, StudentSettings
    from server.broker.daemon import create_server, stop_server
    from server.operator.client import BrokerClient
    from server.operator.output import write_contact_sheet

    gallery = sum(len(v) for v in test_by_node.values())
    student_dirs = students.dirs if students else {}
    student_keys = {"text_tower": not vector_only}
    files = [
        node_files(nid, out / nid, str(student_dirs[nid]), max_k=gallery, **student_keys)
        if nid in student_dirs
        else node_files(nid, out / nid, base_model, max_k=gallery, camera_norm=camera_norm)
        for nid in sorted(test_by_node)
    ]
    nodes = start_node_processes(files, ready_timeout_s=settings.start_timeout_s)
    teachers = [n for n in nodes if n.node_id not in student_dirs]
    server = broker = None
    try:
        wait_until(
            "the node daemons to answer Status",
            lambda: all(n.status(timeout=1.0) for n in nodes),
            settings.start_timeout_s,
            nodes,
        )
        for node in nodes:
            ingest(node, test_by_node[node.node_id], data_root)
        wait_until(
            "the galleries to be indexed",
            lambda: all(indexed(n, len(test_by_node[n.node_id])) for n in nodes),
            settings.start_timeout_s,
            nodes,
        )
        swap_start = time.perf_counter()
        for node in teachers:
            hand_over(adapter, node)
        wait_until(
            f"every node to hot-swap to {expected_version}",
            lambda: all(
                _swapped(n, expected_version, len(test_by_node[n.node_id])) for n in teachers
            ),
            settings.swap_timeout_s,
            nodes,
        )
        swap_seconds = time.perf_counter() - swap_start

        operator = secrets.token_hex(16)
        config = BrokerConfig(
            nodes=tuple(NodeEntry(id=n.node_id, address=n.address, token=n.token) for n in nodes),
            listen="127.0.0.1:0",
            model=base_model,
            adapter=str(adapter),
            operator_tokens=(operator,),
            max_k=gallery,
            default_deadline_ms=settings.deadline_ms,
            max_deadline_ms=max(settings.deadline_ms, 30000),
            health_interval_s=2.0,
            students=StudentSettings(calibration_crops=students.calibration if students else None),
        )
        server, port, broker = create_server(config)
        if broker.model_version != expected_version:
            raise Unavailable(f"broker runs {broker.model_version}, nodes {expected_version}")
        verdicts: dict[str, dict] = {}
        if student_dirs:
            with BrokerClient(f"127.0.0.1:{port}", token=operator) as client:
                wait_until(
                    "the broker to check every student node",
                    lambda: _student_verdicts(client, set(student_dirs), verdicts),
                    settings.start_timeout_s,
                    nodes,
                )
        emb = offline_embeddings
        queries = spread_queries(len(emb.query_texts), settings.max_queries)
        # thousands of queries: keep the broker's per-query log lines out of the terminal
        broker_log = logging.getLogger("server.broker.broker")
        level = broker_log.level
        broker_log.setLevel(logging.WARNING)
        with BrokerClient(f"127.0.0.1:{port}", token=operator) as client:
            keys = [_relative(Path(p), data_root) for p in emb.gallery_paths]
            result = _query_all(client, emb, keys, queries, gallery, settings, progress)
            sheets = []
            where = {key: j for j, key in enumerate(keys)}
            for q in queries[: settings.sheet_queries]:
                request = broker_pb2.BrokerSearchRequest(
                    text=emb.query_texts[q], k=settings.sheet_k, deadline_ms=settings.deadline_ms
                )
                path = out / f"sheet-{len(sheets) + 1}.png"
                response = client.search(request)
                truth = emb.query_ids[q]
                correct = [emb.gallery_ids[where[h.file_name]] == truth for h in response.hits]
                title = f'query: "{emb.query_texts[q]}"  (green frame: the person described)'
                write_contact_sheet(response, client, path, title=title, correct=correct)
                sheets.append(str(path))
        broker_log.setLevel(level)
        result.swap_seconds = swap_seconds
        result.sheet_queries = sheets
        result.students = verdicts
        result.camera_norm = {n.node_id: n.status().camera_norm_version for n in nodes}
        return result
    finally:
        if server is not None:
            stop_server(server, broker)
        for node in nodes:
            node.stop()


def spread_queries(total: int, limit: int) -> list[int]:
    """`limit` query indices evenly spaced over `total` (all of them when `limit` is 0 or
    not smaller): captions come grouped by camera and person, so the first `limit` would
    measure a few cameras only."""
    if not 0 < limit < total:
        return list(range(total))
    step = total / limit
    return [int(i * step) for i in range(limit)]


def _student_verdicts(client, student_ids: set[str], into: dict[str, dict]) -> bool:
    """True once the broker has measured every student node (its verdicts land in `into`)."""
    for health in client.status().nodes:
        check = health.student
        if health.node_id in student_ids and (check.crops or check.note):
            into[health.node_id] = {
                "model_version": health.model_version,
                "teacher_version": check.teacher_version,
                "verified": check.verified,
                "agreement": round(check.agreement, 4),
                "note": check.note,
            }
    return set(into) == student_ids


def indexed(node: NodeProcess, expected: int) -> bool:
    """Whether the daemon holds `expected` crops and is not re-embedding them."""
    s = node.status(timeout=2.0)
    return s.gallery_size == expected and not s.reindex.running


def _swapped(node: NodeProcess, version: str, expected: int) -> bool:
    s = node.status(timeout=2.0)
    return s.model_version == version and s.gallery_size == expected and not s.reindex.running


def _query_all(
    client,
    emb,
    keys: list[str],
    queries: list[int],
    gallery: int,
    settings: ServingSettings,
    progress: bool,
) -> ServingResult:
    """Every caption through the broker; rebuild a similarity matrix from the answers."""
    index = {key: j for j, key in enumerate(keys)}
    sim = np.full((len(queries), len(index)), -np.inf, dtype=np.float64)
    latencies = [0.0] * len(queries)
    full = 0
    modes: dict[str, int] = {}
    broker_top10 = []

    def one(i: int) -> tuple[int, broker_pb2.BrokerSearchResponse, float]:
        q = queries[i]
        request = broker_pb2.BrokerSearchRequest(
            text=emb.query_texts[q], k=gallery, deadline_ms=settings.deadline_ms
        )
        t0 = time.perf_counter()
        response = client.search(request)
        return i, response, 1000 * (time.perf_counter() - t0)

    with ThreadPoolExecutor(settings.concurrency) as pool:
        answers = pool.map(one, range(len(queries)))
        for i, response, ms in tqdm(
            answers,
            total=len(queries),
            desc="broker queries",
            disable=None if progress else True,
            leave=False,
        ):
            latencies[i] = ms
            full += int(response.coverage.full)
            modes[response.merge] = modes.get(response.merge, 0) + 1
            ranked = [index[h.file_name] for h in response.hits]
            # the broker's order, as scores the metric code ranks back exactly
            sim[i, ranked] = np.arange(len(ranked), 0, -1, dtype=np.float64)
            broker_top10.append(ranked[:10])
    ids = emb.query_ids[queries]
    metrics = retrieval_metrics(sim, ids, emb.gallery_ids)
    offline_sim = emb.queries[queries] @ emb.gallery.T
    offline = retrieval_metrics(offline_sim, ids, emb.gallery_ids)
    order = np.argsort(-offline_sim, axis=1, kind="stable")[:, :10]
    agree = float(np.mean([list(order[i]) == broker_top10[i] for i in range(len(queries))]))
    keys = ("R1", "R5", "R10", "mAP", "mINP")
    diff = max(abs(metrics[k] - offline[k]) for k in keys)
    return ServingResult(
        queries=len(queries),
        latencies_ms=latencies,
        coverage_full=full / max(1, len(queries)),
        metrics=metrics,
        offline=offline,
        matches_offline=diff < 0.05,
        max_metric_diff=diff,
        top10_agreement=agree,
        swap_seconds=0.0,
        merge_modes=modes,
        sheet_queries=[],
    )
