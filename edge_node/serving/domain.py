"""The node's request and answer objects: what `service.py` translates protos to and from.

Why plain dataclasses: `Node` is tested and benchmarked without gRPC, and these are the
whole vocabulary between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SearchQuery:
    text: str = ""
    vector: np.ndarray | None = None
    vector_version: str = ""
    k: int = 10
    camera_ids: tuple[str, ...] = ()
    since_ms: int = 0
    until_ms: int = 0
    query_id: str = ""


@dataclass(frozen=True)
class SearchHit:
    image_id: int
    camera_id: str
    timestamp_ms: int
    score: float
    file_name: str


@dataclass(frozen=True)
class SearchResult:
    hits: list[SearchHit]
    model_version: str
    adapter_version: str
    gallery_size: int
    vectors_searched: int
    used_vector: bool
    took_ms: float
    query_version: str = ""  # whose query vectors the node accepts (a student's teacher's)


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes
    width: int
    height: int
    camera_id: str
    timestamp_ms: int
    file_name: str


@dataclass(frozen=True)
class EmbeddedImage:
    """One of the node's own crops as a query vector (find similar): the image stays here."""

    vector: np.ndarray  # (embed_dim,) float32, unit length
    model_version: str
    camera_id: str  # "" and 0 for a calibration probe's crop (from no camera)
    timestamp_ms: int


@dataclass
class ReindexState:
    running: bool = False
    done: int = 0
    total: int = 0
    target_version: str = ""
    last_error: str = ""  # why the last candidate adapter was refused


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    gallery_size: int
    indexed: int
    index_version: str
    model_version: str
    adapter_version: str
    backend: str
    backend_note: str
    index_type: str
    embed_dim: int
    rejected_images: int
    reindex: ReindexState = field(default_factory=ReindexState)
    # the active camera gains ("cn-..."), "none" before any camera has them, "" when
    # [camera-norm] is off; index_version names them too, model_version never does
    camera_norm_version: str = ""
    vector_only: bool = False  # served without the text tower (`text-tower = false`)
    # whose query vectors the node accepts: model_version, or a student's teacher's version
    query_version: str = ""
