"""The gRPC NodeService: proto messages in, domain calls, proto messages out.

Why so thin: everything that can be wrong about a request is decided in `Node` (and the
gallery), where it is tested without gRPC. This module only translates; `rpc` is the
project's one error mapping (`common.rpc.errors.translate_errors`, shared with the
broker) plus the node's hooks: it records the request metrics and carries the request's
query_id into every log line. An unexpected exception is logged with its traceback and
leaves as INTERNAL with a short message, never with the stack trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import numpy as np

from common.rpc.errors import translate_errors
from common.rpc.query_id import query_id_for_log
from protos import node_pb2, node_pb2_grpc, retrieval_pb2

from .domain import SearchQuery, SearchResult
from .gallery import IngestItem
from .validation import check_embed_image

if TYPE_CHECKING:  # importing .node loads faiss: the daemon sets its logging up first
    from .node import Node

log = logging.getLogger(__name__)

# The query id of the request being served on this thread; a logging filter reads it.
query_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("query_id", default="-")

SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name


@contextlib.contextmanager
def _query_id_scope(request) -> Iterator[None]:
    """Carry the request's query id into every log line the call writes; an invalid one
    (newlines, spaces, too long: `common.rpc.query_id`) is logged as "invalid", and the
    request refused by `Node.search`."""
    token = query_id_var.set(query_id_for_log(getattr(request, "query_id", "")))
    try:
        yield
    finally:
        query_id_var.reset(token)


def _record_request(
    servicer: NodeServicer, method: str, code: grpc.StatusCode, seconds: float
) -> None:
    metrics = servicer.node.metrics
    metrics.requests.labels(method, code.name).inc()
    metrics.latency.labels(method).observe(seconds)


# Error mapping (common.rpc.errors), request metrics and query-id logging, per method.
rpc = translate_errors("node", on_outcome=_record_request, scope=_query_id_scope)


def query_from_proto(request: node_pb2.SearchRequest) -> SearchQuery:
    vector = None
    version = ""
    if request.HasField("vector"):
        vector = np.asarray(request.vector.values, dtype=np.float32)
        version = request.vector.model_version
    filters = request.filters
    return SearchQuery(
        text=request.text,
        vector=vector,
        vector_version=version,
        k=request.k,
        camera_ids=tuple(filters.camera_ids),
        since_ms=filters.time_range.since_ms,
        until_ms=filters.time_range.until_ms,
        query_id=request.query_id,
    )


def result_to_proto(result: SearchResult, node_id: str) -> node_pb2.SearchResponse:
    hits = [
        retrieval_pb2.Hit(
            node_id=node_id,
            image_id=h.image_id,
            camera_id=h.camera_id,
            timestamp_ms=h.timestamp_ms,
            score=h.score,
            file_name=h.file_name,
            model_version=result.model_version,
        )
        for h in result.hits
    ]
    return node_pb2.SearchResponse(
        hits=hits,
        model_version=result.model_version,
        adapter_version=result.adapter_version,
        gallery_size=result.gallery_size,
        vectors_searched=result.vectors_searched,
        used_vector=result.used_vector,
        took_ms=result.took_ms,
        query_version=result.query_version,
    )


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    """NodeService methods, named as in protos/node.proto."""

    def __init__(self, node: Node) -> None:
        self.node = node

    @rpc
    def Search(self, request, context):
        result = self.node.search(query_from_proto(request))
        log.info(
            "search k=%d hits=%d searched=%d used_vector=%s took=%.1fms",
            request.k, len(result.hits), result.vectors_searched, result.used_vector,
            result.took_ms,
        )  # fmt: skip
        return result_to_proto(result, self.node.config.node_id)

    @rpc
    def Ingest(self, request, context):
        items = [
            IngestItem(
                data=img.data,
                camera_id=img.camera_id,
                timestamp_ms=img.timestamp_ms,
                captions=tuple(img.captions),
                file_name=img.file_name,
            )
            for img in request.images
        ]
        outcomes = self.node.ingest(items)
        log.info("ingest %d images: %d accepted", len(items), sum(o.accepted for o in outcomes))
        return node_pb2.IngestResponse(
            results=[
                node_pb2.IngestResult(image_id=o.image_id, accepted=o.accepted, reason=o.reason)
                for o in outcomes
            ]
        )

    @rpc
    def GetThumbnail(self, request, context):
        thumb = self.node.thumbnail(request.image_id, request.max_side)
        return retrieval_pb2.ThumbnailResponse(
            jpeg=thumb.jpeg,
            width=thumb.width,
            height=thumb.height,
            camera_id=thumb.camera_id,
            timestamp_ms=thumb.timestamp_ms,
            file_name=thumb.file_name,
        )

    @rpc
    def EmbedImage(self, request, context):
        check_embed_image(request.image_id, request.image)
        if request.image:  # a broker's calibration probe: embedded, not stored
            embedded = self.node.embed_crop(request.image)
        else:
            embedded = self.node.embed_image(request.image_id)
        return node_pb2.EmbedImageResponse(
            vector=retrieval_pb2.QueryVector(
                values=embedded.vector.tolist(), model_version=embedded.model_version
            ),
            camera_id=embedded.camera_id,
            timestamp_ms=embedded.timestamp_ms,
        )

    @rpc
    def Status(self, request, context):
        s = self.node.status()
        return node_pb2.StatusResponse(
            node_id=s.node_id,
            gallery_size=s.gallery_size,
            index_version=s.index_version,
            model_version=s.model_version,
            adapter_version=s.adapter_version,
            backend=s.backend,
            reindex=node_pb2.ReindexProgress(
                running=s.reindex.running,
                done=s.reindex.done,
                total=s.reindex.total,
                target_version=s.reindex.target_version,
            ),
            rejected_images=s.rejected_images,
            index_type=s.index_type,
            embed_dim=s.embed_dim,
            backend_note=s.backend_note,
            indexed_size=s.indexed,
            camera_ids=self.node.gallery.cameras(),  # the broker routes camera filters by these
            camera_norm_version=s.camera_norm_version,
            vector_only=s.vector_only,
            query_version=s.query_version,
        )
