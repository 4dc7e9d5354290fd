from protos import retrieval_pb2 as _retrieval_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BrokerSearchRequest(_message.Message):
    __slots__ = ("text", "k", "deadline_ms", "node_ids", "filters", "require_full_coverage")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_FULL_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    k: int
    deadline_ms: int
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    filters: _retrieval_pb2.Filters
    require_full_coverage: bool
    def __init__(self, text: _Optional[str] = ..., k: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., node_ids: _Optional[_Iterable[str]] = ..., filters: _Optional[_Union[_retrieval_pb2.Filters, _Mapping]] = ..., require_full_coverage: _Optional[bool] = ...) -> None: ...

class NodeOutcome(_message.Message):
    __slots__ = ("node_id", "state", "grpc_status", "message", "took_ms", "gallery_size", "model_version", "used_vector", "hits", "student")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOOK_MS_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    USED_VECTOR_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: str
    grpc_status: str
    message: str
    took_ms: float
    gallery_size: int
    model_version: str
    used_vector: bool
    hits: int
    student: StudentCheck
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[str] = ..., grpc_status: _Optional[str] = ..., message: _Optional[str] = ..., took_ms: _Optional[float] = ..., gallery_size: _Optional[int] = ..., model_version: _Optional[str] = ..., used_vector: _Optional[bool] = ..., hits: _Optional[int] = ..., student: _Optional[_Union[StudentCheck, _Mapping]] = ...) -> None: ...

class StudentCheck(_message.Message):
    __slots__ = ("teacher_version", "verified", "agreement", "crops", "note")
    TEACHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    CROPS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    teacher_version: str
    verified: bool
    agreement: float
    crops: int
    note: str
    def __init__(self, teacher_version: _Optional[str] = ..., verified: _Optional[bool] = ..., agreement: _Optional[float] = ..., crops: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class Coverage(_message.Message):
    __slots__ = ("nodes_total", "nodes_answered", "nodes_timed_out", "nodes_failed", "vectors_searched", "vectors_total", "full", "degraded", "nodes", "nodes_skipped")
    NODES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NODES_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    NODES_TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    NODES_FAILED_FIELD_NUMBER: _ClassVar[int]
    VECTORS_SEARCHED_FIELD_NUMBER: _ClassVar[int]
    VECTORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    nodes_total: int
    nodes_answered: int
    nodes_timed_out: int
    nodes_failed: int
    vectors_searched: int
    vectors_total: int
    full: bool
    degraded: _containers.RepeatedScalarFieldContainer[str]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeOutcome]
    nodes_skipped: int
    def __init__(self, nodes_total: _Optional[int] = ..., nodes_answered: _Optional[int] = ..., nodes_timed_out: _Optional[int] = ..., nodes_failed: _Optional[int] = ..., vectors_searched: _Optional[int] = ..., vectors_total: _Optional[int] = ..., full: _Optional[bool] = ..., degraded: _Optional[_Iterable[str]] = ..., nodes: _Optional[_Iterable[_Union[NodeOutcome, _Mapping]]] = ..., nodes_skipped: _Optional[int] = ...) -> None: ...

class BrokerSearchResponse(_message.Message):
    __slots__ = ("hits", "coverage", "query_id", "merge", "model_version", "took_ms")
    HITS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOOK_MS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_retrieval_pb2.Hit]
    coverage: Coverage
    query_id: str
    merge: str
    model_version: str
    took_ms: float
    def __init__(self, hits: _Optional[_Iterable[_Union[_retrieval_pb2.Hit, _Mapping]]] = ..., coverage: _Optional[_Union[Coverage, _Mapping]] = ..., query_id: _Optional[str] = ..., merge: _Optional[str] = ..., model_version: _Optional[str] = ..., took_ms: _Optional[float] = ...) -> None: ...

class BrokerThumbnailRequest(_message.Message):
    __slots__ = ("node_id", "image_id", "max_side")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    image_id: int
    max_side: int
    def __init__(self, node_id: _Optional[str] = ..., image_id: _Optional[int] = ..., max_side: _Optional[int] = ...) -> None: ...

class BrokerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeHealth(_message.Message):
    __slots__ = ("node_id", "address", "healthy", "state", "last_check_age_s", "last_error", "gallery_size", "model_version", "camera_ids", "indexed_size", "adapter_version", "reindex_running", "reindex_done", "reindex_total", "camera_norm_version", "vector_only", "query_version", "student")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECK_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAMERA_IDS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REINDEX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REINDEX_DONE_FIELD_NUMBER: _ClassVar[int]
    REINDEX_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CAMERA_NORM_VERSION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_ONLY_FIELD_NUMBER: _ClassVar[int]
    QUERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    healthy: bool
    state: str
    last_check_age_s: float
    last_error: str
    gallery_size: int
    model_version: str
    camera_ids: _containers.RepeatedScalarFieldContainer[str]
    indexed_size: int
    adapter_version: str
    reindex_running: bool
    reindex_done: int
    reindex_total: int
    camera_norm_version: str
    vector_only: bool
    query_version: str
    student: StudentCheck
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., state: _Optional[str] = ..., last_check_age_s: _Optional[float] = ..., last_error: _Optional[str] = ..., gallery_size: _Optional[int] = ..., model_version: _Optional[str] = ..., camera_ids: _Optional[_Iterable[str]] = ..., indexed_size: _Optional[int] = ..., adapter_version: _Optional[str] = ..., reindex_running: _Optional[bool] = ..., reindex_done: _Optional[int] = ..., reindex_total: _Optional[int] = ..., camera_norm_version: _Optional[str] = ..., vector_only: _Optional[bool] = ..., query_version: _Optional[str] = ..., student: _Optional[_Union[StudentCheck, _Mapping]] = ...) -> None: ...

class BrokerStatusResponse(_message.Message):
    __slots__ = ("nodes", "model_version")
    NODES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeHealth]
    model_version: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeHealth, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class SearchSimilarRequest(_message.Message):
    __slots__ = ("node_id", "image_id", "k", "deadline_ms", "node_ids", "filters", "require_full_coverage")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_FULL_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    image_id: int
    k: int
    deadline_ms: int
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    filters: _retrieval_pb2.Filters
    require_full_coverage: bool
    def __init__(self, node_id: _Optional[str] = ..., image_id: _Optional[int] = ..., k: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., node_ids: _Optional[_Iterable[str]] = ..., filters: _Optional[_Union[_retrieval_pb2.Filters, _Mapping]] = ..., require_full_coverage: _Optional[bool] = ...) -> None: ...
