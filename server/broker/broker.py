"""BrokerService: one question to every node, under one deadline, merged, with coverage.

Flow of a Search (DESIGN.md §7):
1. Validate the request; fix ONE absolute deadline (the request's, capped by the caller's
   own gRPC deadline, which gRPC Python does not propagate by itself).
2. Embed the text once with the broker's global model (when one is configured).
3. Fan out concurrently: every node call carries the text, the vector and its model
   version, and a timeout of the time remaining minus the merge margin. Stragglers are
   cancelled when that time is up; they become `timed_out` coverage entries.
4. Merge: one model version among the answers -> exact heap merge of raw cosine scores;
   several versions (a node that encoded the text with another model) -> reciprocal rank
   fusion, reported as `merge="rrf"` and degraded reason `mixed_model_versions`.
5. Report coverage; never drop a node silently. No node answered -> UNAVAILABLE.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from common.errors import InvalidQuery, NotFound, Unavailable
from protos import broker_pb2, node_pb2, retrieval_pb2
from server.broker import merge
from server.broker.config import BrokerConfig
from server.broker.metrics import BrokerMetrics
from server.broker.registry import NodeClient, NodeRegistry
from server.broker.routing import route_cameras

log = logging.getLogger(__name__)

MAX_THUMBNAIL_SIDE = 1024


class TextEncoder(Protocol):
    """What the broker needs of the global model (common.model.DualEncoder fits)."""

    version: str

    def encode_text(self, texts: list[str]) -> Any: ...


@dataclass(frozen=True)
class NodeCall:
    """One in-flight node Search."""

    node: NodeClient
    future: grpc.Future | None  # None: not sent, no time was left
    started: float


def new_query_id() -> str:
    return uuid.uuid4().hex[:16]


def logfmt(event: str, **fields: object) -> str:
    """One structured log line, `event key=value ...` (values with spaces quoted)."""
    parts = [event]
    for key, value in fields.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f'{key}="{text}"' if (" " in text or not text) else f"{key}={text}")
    return " ".join(parts)


class Broker:
    """The broker's logic; `BrokerServicer` adapts it to gRPC."""

    def __init__(
        self,
        config: BrokerConfig,
        registry: NodeRegistry,
        *,
        encoder: TextEncoder | None = None,
        metrics: BrokerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics or BrokerMetrics()
        self._clock = clock
        self._encoder = encoder
        self._encoder_lock = threading.Lock()  # one encode at a time; also guards swaps
        self._closers: list[Callable[[], None]] = []
        self.metrics_port: int | None = None  # set by the daemon when metrics are served

    def add_closer(self, close: Callable[[], None]) -> None:
        """Something to release with the broker (the daemon's metrics server)."""
        self._closers.append(close)

    def close(self) -> None:
        """Stop health checks, close node channels, release what the daemon attached."""
        self.registry.close()
        while self._closers:
            self._closers.pop()()

    # ------------------------------------------------------------------ model
    @property
    def model_version(self) -> str:
        return self._encoder.version if self._encoder is not None else ""

    def set_encoder(self, encoder: TextEncoder | None) -> None:
        """Swap the global model (e.g. after a federated round); in-flight queries finish."""
        with self._encoder_lock:
            self._encoder = encoder
        log.info(logfmt("broker_model", version=self.model_version or "none"))

    def embed(self, text: str) -> retrieval_pb2.QueryVector | None:
        with self._encoder_lock:
            if self._encoder is None:
                return None
            out = self._encoder.encode_text([text])
            version = self._encoder.version
        values = [float(x) for x in out[0].tolist()]
        return retrieval_pb2.QueryVector(values=values, model_version=version)

    # ------------------------------------------------------------------ validation
    def _check(self, request: broker_pb2.BrokerSearchRequest) -> tuple[str, int, float]:
        """Validated (text, k, deadline seconds); raises InvalidQuery naming the field."""
        cfg = self.config
        text = request.text.strip()
        if not text:
            raise InvalidQuery("`text` is empty: describe the person to look for")
        if len(text) > cfg.max_text_chars:
            raise InvalidQuery(
                f"`text` has {len(text)} characters; the limit is {cfg.max_text_chars}"
            )
        if not 1 <= request.k <= cfg.max_k:
            raise InvalidQuery(f"`k` must be between 1 and {cfg.max_k}, got {request.k}")
        deadline_ms = request.deadline_ms or cfg.default_deadline_ms
        if request.deadline_ms < 0 or deadline_ms > cfg.max_deadline_ms:
            raise InvalidQuery(
                f"`deadline_ms` must be between 1 and {cfg.max_deadline_ms} (0: default "
                f"{cfg.default_deadline_ms}), got {request.deadline_ms}"
            )
        if deadline_ms <= cfg.merge_margin_ms:
            raise InvalidQuery(
                f"`deadline_ms` {deadline_ms} leaves no time for nodes: it must exceed the "
                f"broker's merge margin of {cfg.merge_margin_ms} ms"
            )
        time_range = request.filters.time_range
        if time_range.since_ms < 0 or time_range.until_ms < 0:
            raise InvalidQuery("time range: `since_ms`/`until_ms` must be >= 0 (0 means open)")
        if (
            time_range.since_ms
            and time_range.until_ms
            and time_range.since_ms > time_range.until_ms
        ):
            raise InvalidQuery(
                f"time range: since ({time_range.since_ms}) is after until ({time_range.until_ms})"
            )
        if any(not cam.strip() for cam in request.filters.camera_ids):
            raise InvalidQuery("`filters.camera_ids` holds an empty camera id")
        return text, request.k, deadline_ms / 1000.0

    def _targets(self, node_ids: Sequence[str]) -> list[NodeClient]:
        try:
            return self.registry.select(node_ids)
        except KeyError as err:
            unknown = err.args[0]
            raise InvalidQuery(
                f"unknown node id(s) {unknown}; registered: {self.registry.ids}"
            ) from err

    # ------------------------------------------------------------------ search
    def search(
        self,
        request: broker_pb2.BrokerSearchRequest,
        *,
        query_id: str | None = None,
        caller_remaining_s: float | None = None,
    ) -> broker_pb2.BrokerSearchResponse:
        """Answer one operator query (see the module docstring for the steps)."""
        started = self._clock()
        query_id = query_id or new_query_id()
        text, k, budget_s = self._check(request)
        targets = self._targets(request.node_ids)
        if caller_remaining_s is not None:
            budget_s = min(budget_s, caller_remaining_s)
        deadline = started + budget_s
        margin_s = self.config.merge_margin_ms / 1000.0

        route = route_cameras(
            {n.id: self.registry.snapshot(n.id).cameras for n in targets},
            list(request.filters.camera_ids),
        )
        vector = self.embed(text)
        node_request = node_pb2.SearchRequest(
            text=text, k=k, filters=request.filters, query_id=query_id
        )
        if vector is not None:
            node_request.vector.CopyFrom(vector)
        calls = {
            node.id: self._send(
                node, node_request, route.send[node.id], query_id, deadline - margin_s
            )
            for node in targets
            if node.id in route.send
        }
        self._wait(list(calls.values()), deadline - margin_s / 2)

        outcomes, answers = [], {}
        for node in targets:
            if node.id not in calls:
                outcomes.append(self._skipped(node))
                continue
            outcome, answer = self._collect(calls[node.id])
            outcomes.append(outcome)
            if answer is not None:
                answers[node.id] = answer
            self.metrics.observe_node(
                outcome.node_id, outcome.state, outcome.grpc_status, outcome.took_ms
            )
        response = self._respond(outcomes, answers, k, query_id)
        response.took_ms = (self._clock() - started) * 1000.0
        self._finish(request, response, outcomes)
        return response

    def _send(
        self,
        node: NodeClient,
        request: node_pb2.SearchRequest,
        camera_ids: list[str],
        query_id: str,
        until: float,
    ) -> NodeCall:
        now = self._clock()
        timeout = until - now
        if timeout <= 0:
            return NodeCall(node, None, now)
        if list(request.filters.camera_ids) != camera_ids:  # only this node's own cameras
            own = node_pb2.SearchRequest()
            own.CopyFrom(request)
            del own.filters.camera_ids[:]
            own.filters.camera_ids.extend(camera_ids)
            request = own
        future = node.stub.Search.future(request, timeout=timeout, metadata=node.metadata(query_id))
        return NodeCall(node, future, now)

    def _wait(self, calls: list[NodeCall], until: float) -> None:
        """Block until every call finished or `until`; then cancel the stragglers."""
        pending = [c.future for c in calls if c.future is not None]
        done = threading.Semaphore(0)
        for future in pending:
            future.add_done_callback(lambda _f: done.release())
        for _ in pending:
            if not done.acquire(timeout=max(0.0, until - self._clock())):
                break
        for future in pending:
            if not future.done():
                future.cancel()

    def _skipped(self, node: NodeClient) -> broker_pb2.NodeOutcome:
        known = self.registry.snapshot(node.id)
        return broker_pb2.NodeOutcome(
            node_id=node.id,
            state="skipped",
            message="holds none of the requested cameras",
            gallery_size=known.gallery_size,
            model_version=known.model_version,
        )

    def _collect(
        self, call: NodeCall
    ) -> tuple[broker_pb2.NodeOutcome, node_pb2.SearchResponse | None]:
        node = call.node
        known = self.registry.snapshot(node.id)
        outcome = broker_pb2.NodeOutcome(
            node_id=node.id, gallery_size=known.gallery_size, model_version=known.model_version
        )
        if call.future is None:
            outcome.state, outcome.grpc_status = "timed_out", "DEADLINE_EXCEEDED"
            outcome.message = "not sent: the deadline was spent before this node's turn"
            return outcome, None
        future = call.future
        try:
            answer = future.result(timeout=0) if future.done() and not future.cancelled() else None
        except grpc.RpcError as err:
            code = err.code()
            outcome.took_ms = (self._clock() - call.started) * 1000.0
            outcome.grpc_status = code.name
            outcome.message = err.details() or ""
            late = code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
            outcome.state = "timed_out" if late else "failed"
            return outcome, None
        if answer is None:  # cancelled by us in _wait
            outcome.state, outcome.grpc_status = "timed_out", "DEADLINE_EXCEEDED"
            outcome.message = "no answer before the query deadline; call cancelled"
            outcome.took_ms = (self._clock() - call.started) * 1000.0
            return outcome, None
        outcome.state = "ok"
        outcome.took_ms = answer.took_ms or (self._clock() - call.started) * 1000.0
        outcome.gallery_size = answer.gallery_size
        outcome.model_version = answer.model_version
        outcome.used_vector = answer.used_vector
        outcome.hits = len(answer.hits)
        self.registry.learn(
            node.id, gallery_size=answer.gallery_size, model_version=answer.model_version
        )
        return outcome, answer

    def _respond(
        self,
        outcomes: list[broker_pb2.NodeOutcome],
        answers: dict[str, node_pb2.SearchResponse],
        k: int,
        query_id: str,
    ) -> broker_pb2.BrokerSearchResponse:
        coverage = coverage_of(outcomes, answers)
        if not answers and not coverage.nodes_skipped:
            raise Unavailable(f"no node answered query {query_id}: {describe_outcomes(outcomes)}")
        by_version: dict[str, list[list[retrieval_pb2.Hit]]] = {}
        for node_id, answer in answers.items():
            by_version.setdefault(answer.model_version, []).append(list(_hits_of(node_id, answer)))
        response = broker_pb2.BrokerSearchResponse(
            query_id=query_id, model_version=self.model_version, coverage=coverage
        )
        if len(by_version) <= 1:  # zero: every selected node was skipped by camera routing
            response.merge = "score"
            for lists in by_version.values():
                response.hits.extend(merge.merge_topk(lists, k))
        else:
            response.merge = "rrf"
            response.coverage.degraded.append("mixed_model_versions")
            for fused in merge.merge_mixed_versions(by_version, k):
                hit = response.hits.add()
                hit.CopyFrom(fused.hit)
                hit.score = fused.fused_score  # RRF score; raw cosines are not comparable
        return response

    def _finish(
        self,
        request: broker_pb2.BrokerSearchRequest,
        response: broker_pb2.BrokerSearchResponse,
        outcomes: list[broker_pb2.NodeOutcome],
    ) -> None:
        """Log the query; enforce `require_full_coverage`; count it as answered."""
        cov = response.coverage
        log.info(
            logfmt(
                "search",
                query_id=response.query_id,
                k=request.k,
                nodes=cov.nodes_total,
                answered=cov.nodes_answered,
                timed_out=cov.nodes_timed_out,
                failed=cov.nodes_failed,
                merge=response.merge,
                degraded=",".join(cov.degraded) or "-",
                hits=len(response.hits),
                took_ms=response.took_ms,
            )
        )
        if request.require_full_coverage and not cov.full:
            raise Unavailable(
                f"incomplete coverage and require_full_coverage is set "
                f"(query {response.query_id}): {cov.nodes_answered}/{cov.nodes_total} "
                f"nodes answered; {describe_outcomes(outcomes)}"
            )
        self.metrics.observe_query(
            response.merge,
            response.took_ms / 1000.0,
            cov.nodes_answered + cov.nodes_skipped,
            cov.nodes_total,
            list(cov.degraded),
        )

    # ------------------------------------------------------------------ thumbnails, status
    def thumbnail(
        self, request: broker_pb2.BrokerThumbnailRequest
    ) -> retrieval_pb2.ThumbnailResponse:
        """Proxy one thumbnail from its node; grpc.RpcError from the node propagates."""
        if request.node_id not in self.registry.ids:
            raise NotFound(f"unknown node id {request.node_id!r}; registered: {self.registry.ids}")
        if request.image_id <= 0:
            raise InvalidQuery(f"`image_id` must be positive, got {request.image_id}")
        if not 0 <= request.max_side <= MAX_THUMBNAIL_SIDE:
            raise InvalidQuery(
                f"`max_side` must be 0..{MAX_THUMBNAIL_SIDE}, got {request.max_side}"
            )
        node = self.registry.get(request.node_id)
        return node.stub.GetThumbnail(
            node_pb2.ThumbnailRequest(image_id=request.image_id, max_side=request.max_side),
            timeout=self.config.default_deadline_ms / 1000.0,
            metadata=node.metadata(),
        )

    def status(self) -> broker_pb2.BrokerStatusResponse:
        response = broker_pb2.BrokerStatusResponse(model_version=self.model_version)
        now = time.monotonic()
        for node_id in self.registry.ids:
            s = self.registry.snapshot(node_id)
            self.metrics.node_healthy.labels(node_id).set(1 if s.healthy else 0)
            response.nodes.add(
                node_id=node_id,
                address=self.registry.get(node_id).entry.address,
                healthy=s.healthy,
                state=s.state,
                last_check_age_s=(now - s.last_check) if s.last_check is not None else -1.0,
                last_error=s.last_error,
                gallery_size=s.gallery_size,
                model_version=s.model_version,
                camera_ids=list(s.cameras or ()),
            )
        return response


def _hits_of(node_id: str, answer: node_pb2.SearchResponse):
    """A node's hits keyed by the broker's id for it, stamped with the version that scored them."""
    for hit in answer.hits:
        out = retrieval_pb2.Hit()
        out.CopyFrom(hit)
        out.node_id = node_id
        if not out.model_version:
            out.model_version = answer.model_version
        yield out


def coverage_of(
    outcomes: list[broker_pb2.NodeOutcome], answers: dict[str, node_pb2.SearchResponse]
) -> broker_pb2.Coverage:
    """The coverage block (Elasticsearch `_shards` + Vespa `coverage`)."""
    cov = broker_pb2.Coverage(nodes_total=len(outcomes))
    for o in outcomes:
        if o.state == "ok":
            cov.nodes_answered += 1
            cov.vectors_searched += answers[o.node_id].vectors_searched
        elif o.state == "skipped":
            cov.nodes_skipped += 1
        elif o.state == "timed_out":
            cov.nodes_timed_out += 1
        else:
            cov.nodes_failed += 1
        cov.vectors_total += o.gallery_size
    cov.full = cov.nodes_answered + cov.nodes_skipped == cov.nodes_total
    if cov.nodes_timed_out:
        cov.degraded.append("timeout")
    if cov.nodes_failed:
        cov.degraded.append("node_failure")
    cov.nodes.extend(outcomes)
    return cov


def describe_outcomes(outcomes: Sequence[broker_pb2.NodeOutcome]) -> str:
    """`node-a ok; node-b failed UNAVAILABLE (connection refused); ...` for error messages."""
    parts = []
    for o in outcomes:
        if o.state in ("ok", "skipped"):
            parts.append(f"{o.node_id} {o.state}")
        else:
            detail = f" ({o.message})" if o.message else ""
            parts.append(f"{o.node_id} {o.state} {o.grpc_status}{detail}")
    return "; ".join(parts)
