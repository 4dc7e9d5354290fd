"""BrokerService: one question to every node, under one deadline, merged, with coverage.

Flow of a Search (DESIGN.md §7):
1. Validate the request (`validation`); fix ONE absolute deadline (the request's, capped by
   the caller's own gRPC deadline, which gRPC Python does not propagate by itself).
2. Embed the text once with the broker's global model (when one is configured).
3. Fan out concurrently (`fanout`): every node call carries the text, the vector and its
   model version, and a timeout of the time remaining minus the merge margin. Stragglers
   are cancelled when that time is up; they become `timed_out` coverage entries.
4. Merge: one model version among the answers -> exact heap merge of raw cosine scores;
   several versions (a node that encoded the text with another model) -> reciprocal rank
   fusion, reported as `merge="rrf"` and degraded reason `mixed_model_versions`. A
   distilled student of the broker's model whose embeddings the broker verified
   (`students`) counts as the broker's version: merged by score, named in coverage.
5. Report coverage (`coverage`); never drop a node silently. No node answered -> UNAVAILABLE.

`Broker` keeps the orchestration of those steps, the thumbnail proxy, status and the
global model; the steps themselves live in the modules named above.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import numpy as np

from common.errors import FedRetrieveError, NotFound, Unavailable, status_code_for
from protos import broker_pb2, node_pb2, retrieval_pb2
from server.broker import merge
from server.broker.config import BrokerConfig
from server.broker.coverage import (
    coverage_of,
    describe_outcomes,
    note_no_query_vector,
    require_an_answer,
    require_full,
    skipped_outcome,
)
from server.broker.fanout import AdaptiveWait, NodeCall, collect, fan_out
from server.broker.metrics import BrokerMetrics
from server.broker.registry import NodeRegistry
from server.broker.routing import route_cameras
from server.broker.students import StudentChecks
from server.broker.topk import hits_per_node
from server.broker.validation import (
    MAX_THUMBNAIL_SIDE,
    ValidSearch,
    check_search,
    check_similar,
    check_thumbnail,
    select_targets,
)

__all__ = [
    "MAX_THUMBNAIL_SIDE",
    "Broker",
    "NodeCall",
    "TextEncoder",
    "coverage_of",
    "describe_outcomes",
    "logfmt",
    "new_query_id",
]

log = logging.getLogger(__name__)


class TextEncoder(Protocol):
    """What the broker needs of the global model (common.model.DualEncoder fits):
    `encode_text` for every query; `encode_images` only to verify student nodes
    (server/broker/students.py), and an encoder without it verifies none."""

    version: str

    def encode_text(self, texts: list[str]) -> Any: ...

    def encode_images(self, images: list[Any]) -> Any: ...


def new_query_id() -> str:
    return uuid.uuid4().hex[:16]


def logfmt(event: str, **fields: object) -> str:
    """One structured log line, `event key=value ...` (values with spaces quoted)."""
    parts = [event]
    for key, value in fields.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f'{key}="{text}"' if (" " in text or not text) else f"{key}={text}")
    return " ".join(parts)


def _counted_query(search: Callable[..., Any]) -> Callable[..., Any]:
    """Count a Search that fails in `queries_total{outcome=<gRPC status>}` (answered ones are
    counted as "ok" in `_finish`). Only Search: thumbnails and Status are not queries."""

    @functools.wraps(search)
    def counted(self: Broker, *args: Any, **kwargs: Any) -> Any:
        try:
            return search(self, *args, **kwargs)
        except FedRetrieveError as err:
            self.metrics.observe_query_error(status_code_for(err).name)
            raise
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            self.metrics.observe_query_error(code.name)
            raise
        except Exception:
            self.metrics.observe_query_error(grpc.StatusCode.INTERNAL.name)
            raise

    return counted


class Broker:
    """The broker's logic; `BrokerServicer` adapts it to gRPC. Thread-safe."""

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
        self._closers_lock = threading.Lock()  # add_closer (daemon) vs close (any thread)
        self.metrics_port: int | None = None  # set by the daemon when metrics are served
        self.students = StudentChecks(config.students)
        registry.after_checks(self.verify_students)
        registry.watch_health(  # the gauge follows the periodic checks, not Status calls
            lambda node_id, healthy: self.metrics.node_healthy.labels(node_id).set(
                1.0 if healthy else 0.0
            )
        )
        tail = config.tail
        self._adaptive = AdaptiveWait(
            min_share=tail.adaptive_min_coverage,
            factor=tail.adaptive_wait_factor,
            max_extra_s=tail.adaptive_max_extra_ms / 1000.0,
        )

    def add_closer(self, close: Callable[[], None]) -> None:
        """Something to release with the broker (the daemon's metrics server)."""
        with self._closers_lock:
            self._closers.append(close)

    def close(self) -> None:
        """Stop health checks, close node channels, release what the daemon attached."""
        self.registry.close()
        with self._closers_lock:  # taken in one step: two closes never pop the same one
            closers, self._closers = self._closers, []
        while closers:
            closers.pop()()

    # ------------------------------------------------------------------ model
    @property
    def model_version(self) -> str:
        encoder = self._encoder  # read once: `set_encoder` may swap it meanwhile
        return encoder.version if encoder is not None else ""

    def set_encoder(self, encoder: TextEncoder | None) -> None:
        """Swap the global model (e.g. after a federated round); in-flight queries finish."""
        with self._encoder_lock:
            self._encoder = encoder
            version = encoder.version if encoder is not None else ""
        log.info(logfmt("broker_model", version=version or "none"))

    def embed(self, text: str) -> retrieval_pb2.QueryVector | None:
        with self._encoder_lock:
            if self._encoder is None:
                return None
            out = self._encoder.encode_text([text])
            version = self._encoder.version
        values = [float(x) for x in out[0].tolist()]
        return retrieval_pb2.QueryVector(values=values, model_version=version)

    def embed_images(self, images: list[Any], batch_size: int = 8) -> tuple[str, np.ndarray] | None:
        """(version, unit rows) of `images` by the global model's image tower, a few at a
        time so queries wait at most one batch; None without an encoder that embeds images,
        or when the global model changed in between."""
        rows, version = [], None
        for i in range(0, len(images), batch_size):
            with self._encoder_lock:
                encoder = self._encoder
                if encoder is None or not hasattr(encoder, "encode_images"):
                    return None
                if version not in (None, encoder.version):
                    return None
                version = encoder.version
                out = encoder.encode_images(images[i : i + batch_size])
            rows.append(np.asarray(out, dtype=np.float32))
        return (version or "", np.concatenate(rows)) if rows else None

    def verify_students(self) -> None:
        """After a health-check round: probe each student node of the global model that
        has no verdict yet (server/broker/students.py)."""
        version = self.model_version
        for node_id in self.registry.ids:
            self.students.verify(
                self.registry.get(node_id), self.registry.snapshot(node_id), version,
                self.embed_images,
            )  # fmt: skip

    # ------------------------------------------------------------------ search
    @_counted_query
    def search(
        self,
        request: broker_pb2.BrokerSearchRequest,
        *,
        query_id: str | None = None,
        caller_remaining_s: float | None = None,
        vector: retrieval_pb2.QueryVector | None = None,
    ) -> broker_pb2.BrokerSearchResponse:
        """Answer one operator query (see the module docstring for the steps)."""
        started = self._clock()
        valid = check_search(request, self.config)
        if vector is None or vector.model_version != self.model_version or not self.model_version:
            vector = self.embed(valid.text)  # (an upper tier's vector is used when it fits)
        return self._answer(
            valid, request, vector, query_id or new_query_id(), caller_remaining_s, started
        )

    @_counted_query
    def search_similar(
        self,
        request: broker_pb2.SearchSimilarRequest,
        *,
        query_id: str | None = None,
        caller_remaining_s: float | None = None,
    ) -> broker_pb2.BrokerSearchResponse:
        """Find similar: the node holding the image embeds it (NodeService.EmbedImage; the
        image never leaves it) and that vector is fanned out like a text query's. Nodes on
        another model version cannot compare it and report failed, by name."""
        started = self._clock()
        valid = check_similar(request, self.config, self.registry.ids)
        budget_s = min(valid.budget_s, caller_remaining_s or valid.budget_s)
        owner = self.registry.get(request.node_id)
        query_id = query_id or new_query_id()
        try:
            embedded = owner.stub.EmbedImage(
                node_pb2.EmbedImageRequest(image_id=request.image_id),
                timeout=max(0.001, budget_s / 2),
                metadata=owner.metadata(query_id),
            )
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"node {request.node_id}: {details}") from err
            raise Unavailable(
                f"node {request.node_id} could not embed image {request.image_id}: "
                f"{code.name} {details}"
            ) from err
        spent = self._clock() - started
        return self._answer(valid, request, embedded.vector, query_id, budget_s - spent, started)

    def _answer(
        self,
        valid: ValidSearch,
        request: broker_pb2.BrokerSearchRequest | broker_pb2.SearchSimilarRequest,
        vector: retrieval_pb2.QueryVector | None,
        query_id: str,
        caller_remaining_s: float | None,
        started: float,
    ) -> broker_pb2.BrokerSearchResponse:
        """Steps 3-5 of the module docstring for a validated query and its vector."""
        targets = select_targets(self.registry, request.node_ids)
        budget_s = valid.budget_s
        if caller_remaining_s is not None:
            budget_s = min(budget_s, caller_remaining_s)
        deadline = started + budget_s
        margin_s = self.config.merge_margin_ms / 1000.0

        route = route_cameras(
            {n.id: self.registry.snapshot(n.id).cameras for n in targets},
            list(request.filters.camera_ids),
        )
        node_request = node_pb2.SearchRequest(
            text=valid.text, k=valid.k, filters=request.filters, query_id=query_id
        )
        if vector is not None:
            node_request.vector.CopyFrom(vector)
        asked = [node for node in targets if node.id in route.send]
        per_node_k = hits_per_node(
            valid.k,
            [self.registry.snapshot(n.id).gallery_size for n in asked],
            self.config.tail.topk_probability,
        )
        fan = fan_out(
            [(n, route.send[n.id], k) for n, k in zip(asked, per_node_k, strict=True)],
            node_request,
            query_id,
            calls=self.registry.calls,
            send_until=deadline - margin_s,
            wait_until=deadline - margin_s / 2,
            clock=self._clock,
            adaptive=self._adaptive,
            started=started,
        )
        calls = fan.calls

        sent = vector.model_version if vector is not None else ""
        outcomes, answers, same_space = [], {}, {}
        for node in targets:
            if node.id not in calls:
                outcomes.append(skipped_outcome(node.id, self.registry.snapshot(node.id)))
                continue
            outcome, answer = collect(
                calls[node.id], self.registry, self._clock, adaptive_cut=fan.cut_at is not None
            )
            if vector is None:
                note_no_query_vector(outcome, self.registry.snapshot(node.id))
            outcomes.append(outcome)
            if answer is not None:
                answers[node.id] = answer
                known = self.registry.snapshot(node.id)  # a node older than query_version
                query_version = answer.query_version or known.query_version
                if self.students.note_answer(outcome, answer, query_version, sent):
                    same_space[node.id] = sent  # a verified student: scores comparable
            self.metrics.observe_node(
                outcome.node_id, outcome.state, outcome.grpc_status, outcome.took_ms
            )
        response = self._respond(outcomes, answers, valid.k, query_id, same_space)
        if fan.cut_at is not None:
            response.coverage.degraded.append("adaptive_timeout")
        response.took_ms = (self._clock() - started) * 1000.0
        self._finish(valid.k, request.require_full_coverage, response, outcomes)
        return response

    def _respond(
        self,
        outcomes: list[broker_pb2.NodeOutcome],
        answers: dict[str, node_pb2.SearchResponse],
        k: int,
        query_id: str,
        same_space: dict[str, str] | None = None,
    ) -> broker_pb2.BrokerSearchResponse:
        coverage = coverage_of(outcomes, answers)
        require_an_answer(coverage, outcomes, query_id)
        response = broker_pb2.BrokerSearchResponse(
            query_id=query_id, model_version=self.model_version, coverage=coverage
        )
        _merge_into(response, answers, k, same_space)
        return response

    def _finish(
        self,
        k: int,
        require_full_coverage: bool,
        response: broker_pb2.BrokerSearchResponse,
        outcomes: list[broker_pb2.NodeOutcome],
    ) -> None:
        """Log the query; enforce `require_full_coverage`; count it as answered."""
        cov = response.coverage
        log.info(
            logfmt(
                "search",
                query_id=response.query_id,
                k=k,
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
        if require_full_coverage:
            require_full(cov, outcomes, response.query_id)
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
        node_id, _, site = request.node_id.partition("/")  # "region/site" through a tier
        direct = broker_pb2.BrokerThumbnailRequest()
        direct.CopyFrom(request)
        direct.node_id = node_id
        check_thumbnail(direct, self.registry.ids)
        node = self.registry.get(node_id)
        return node.stub.GetThumbnail(
            node_pb2.ThumbnailRequest(
                image_id=request.image_id, max_side=request.max_side, node_id=site
            ),
            timeout=self.config.default_deadline_ms / 1000.0,
            metadata=node.metadata(),
        )

    def status(self) -> broker_pb2.BrokerStatusResponse:
        response = broker_pb2.BrokerStatusResponse(model_version=self.model_version)
        now = time.monotonic()
        for node_id in self.registry.ids:
            s = self.registry.snapshot(node_id)
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
                indexed_size=s.indexed_size,
                adapter_version=s.adapter_version,
                camera_norm_version=s.camera_norm_version,
                reindex_running=s.reindex[0],
                reindex_done=s.reindex[1],
                reindex_total=s.reindex[2],
                vector_only=s.vector_only,
                query_version=s.query_version,
            )
            check = self.students.check_of(
                node_id, s.model_version, s.query_version, response.model_version
            )
            if check is not None:
                response.nodes[-1].student.CopyFrom(check)
        return response


def _merge_into(
    response: broker_pb2.BrokerSearchResponse,
    answers: dict[str, node_pb2.SearchResponse],
    k: int,
    score_space: dict[str, str] | None = None,
) -> None:
    """Merged hits into `response`: exact score merge for one model version, RRF for several.
    `score_space` maps a node to the version its scores are comparable with when that is
    not its own (a verified student: the broker's); its hits keep their own version."""
    score_space = score_space or {}
    by_version: dict[str, list[list[retrieval_pb2.Hit]]] = {}
    for node_id, answer in answers.items():
        version = score_space.get(node_id, answer.model_version)
        by_version.setdefault(version, []).append(list(_hits_of(node_id, answer)))
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


def _hits_of(node_id: str, answer: node_pb2.SearchResponse):
    """A node's hits keyed by the broker's id for it, stamped with the version that scored them."""
    tier = len(answer.lower_tier) > 0  # a regional broker: keep the site under it
    for hit in answer.hits:
        out = retrieval_pb2.Hit()
        out.CopyFrom(hit)
        out.node_id = f"{node_id}/{hit.node_id}" if tier else node_id
        if not out.model_version:
            out.model_version = answer.model_version
        yield out
