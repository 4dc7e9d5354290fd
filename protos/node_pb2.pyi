from protos import retrieval_pb2 as _retrieval_pb2
from protos import broker_pb2 as _broker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("text", "vector", "k", "filters", "query_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    vector: _retrieval_pb2.QueryVector
    k: int
    filters: _retrieval_pb2.Filters
    query_id: str
    def __init__(self, text: _Optional[str] = ..., vector: _Optional[_Union[_retrieval_pb2.QueryVector, _Mapping]] = ..., k: _Optional[int] = ..., filters: _Optional[_Union[_retrieval_pb2.Filters, _Mapping]] = ..., query_id: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "model_version", "adapter_version", "gallery_size", "vectors_searched", "used_vector", "took_ms", "lower_tier", "query_version")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    VECTORS_SEARCHED_FIELD_NUMBER: _ClassVar[int]
    USED_VECTOR_FIELD_NUMBER: _ClassVar[int]
    TOOK_MS_FIELD_NUMBER: _ClassVar[int]
    LOWER_TIER_FIELD_NUMBER: _ClassVar[int]
    QUERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_retrieval_pb2.Hit]
    model_version: str
    adapter_version: str
    gallery_size: int
    vectors_searched: int
    used_vector: bool
    took_ms: float
    lower_tier: _containers.RepeatedCompositeFieldContainer[_broker_pb2.NodeOutcome]
    query_version: str
    def __init__(self, hits: _Optional[_Iterable[_Union[_retrieval_pb2.Hit, _Mapping]]] = ..., model_version: _Optional[str] = ..., adapter_version: _Optional[str] = ..., gallery_size: _Optional[int] = ..., vectors_searched: _Optional[int] = ..., used_vector: _Optional[bool] = ..., took_ms: _Optional[float] = ..., lower_tier: _Optional[_Iterable[_Union[_broker_pb2.NodeOutcome, _Mapping]]] = ..., query_version: _Optional[str] = ...) -> None: ...

class ImageItem(_message.Message):
    __slots__ = ("data", "camera_id", "timestamp_ms", "captions", "file_name")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    camera_id: str
    timestamp_ms: int
    captions: _containers.RepeatedScalarFieldContainer[str]
    file_name: str
    def __init__(self, data: _Optional[bytes] = ..., camera_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., captions: _Optional[_Iterable[str]] = ..., file_name: _Optional[str] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageItem]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageItem, _Mapping]]] = ...) -> None: ...

class IngestResult(_message.Message):
    __slots__ = ("image_id", "accepted", "reason")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    image_id: int
    accepted: bool
    reason: str
    def __init__(self, image_id: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[IngestResult]
    def __init__(self, results: _Optional[_Iterable[_Union[IngestResult, _Mapping]]] = ...) -> None: ...

class ThumbnailRequest(_message.Message):
    __slots__ = ("image_id", "max_side", "node_id")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: int
    max_side: int
    node_id: str
    def __init__(self, image_id: _Optional[int] = ..., max_side: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReindexProgress(_message.Message):
    __slots__ = ("running", "done", "total", "target_version")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    running: bool
    done: int
    total: int
    target_version: str
    def __init__(self, running: _Optional[bool] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., target_version: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "gallery_size", "index_version", "model_version", "adapter_version", "backend", "reindex", "rejected_images", "index_type", "embed_dim", "backend_note", "indexed_size", "camera_ids", "camera_norm_version", "vector_only", "query_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REINDEX_FIELD_NUMBER: _ClassVar[int]
    REJECTED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    BACKEND_NOTE_FIELD_NUMBER: _ClassVar[int]
    INDEXED_SIZE_FIELD_NUMBER: _ClassVar[int]
    CAMERA_IDS_FIELD_NUMBER: _ClassVar[int]
    CAMERA_NORM_VERSION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_ONLY_FIELD_NUMBER: _ClassVar[int]
    QUERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    gallery_size: int
    index_version: str
    model_version: str
    adapter_version: str
    backend: str
    reindex: ReindexProgress
    rejected_images: int
    index_type: str
    embed_dim: int
    backend_note: str
    indexed_size: int
    camera_ids: _containers.RepeatedScalarFieldContainer[str]
    camera_norm_version: str
    vector_only: bool
    query_version: str
    def __init__(self, node_id: _Optional[str] = ..., gallery_size: _Optional[int] = ..., index_version: _Optional[str] = ..., model_version: _Optional[str] = ..., adapter_version: _Optional[str] = ..., backend: _Optional[str] = ..., reindex: _Optional[_Union[ReindexProgress, _Mapping]] = ..., rejected_images: _Optional[int] = ..., index_type: _Optional[str] = ..., embed_dim: _Optional[int] = ..., backend_note: _Optional[str] = ..., indexed_size: _Optional[int] = ..., camera_ids: _Optional[_Iterable[str]] = ..., camera_norm_version: _Optional[str] = ..., vector_only: _Optional[bool] = ..., query_version: _Optional[str] = ...) -> None: ...

class EmbedImageRequest(_message.Message):
    __slots__ = ("image_id", "image")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image_id: int
    image: bytes
    def __init__(self, image_id: _Optional[int] = ..., image: _Optional[bytes] = ...) -> None: ...

class EmbedImageResponse(_message.Message):
    __slots__ = ("vector", "camera_id", "timestamp_ms")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    vector: _retrieval_pb2.QueryVector
    camera_id: str
    timestamp_ms: int
    def __init__(self, vector: _Optional[_Union[_retrieval_pb2.QueryVector, _Mapping]] = ..., camera_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...
