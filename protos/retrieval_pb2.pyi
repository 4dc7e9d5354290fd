from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TimeRange(_message.Message):
    __slots__ = ("since_ms", "until_ms")
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    since_ms: int
    until_ms: int
    def __init__(self, since_ms: _Optional[int] = ..., until_ms: _Optional[int] = ...) -> None: ...

class Filters(_message.Message):
    __slots__ = ("camera_ids", "time_range")
    CAMERA_IDS_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    camera_ids: _containers.RepeatedScalarFieldContainer[str]
    time_range: TimeRange
    def __init__(self, camera_ids: _Optional[_Iterable[str]] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ...) -> None: ...

class QueryVector(_message.Message):
    __slots__ = ("values", "model_version")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    def __init__(self, values: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("node_id", "image_id", "camera_id", "timestamp_ms", "score", "file_name", "model_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    image_id: int
    camera_id: str
    timestamp_ms: int
    score: float
    file_name: str
    model_version: str
    def __init__(self, node_id: _Optional[str] = ..., image_id: _Optional[int] = ..., camera_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., score: _Optional[float] = ..., file_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ThumbnailResponse(_message.Message):
    __slots__ = ("jpeg", "width", "height", "camera_id", "timestamp_ms", "file_name")
    JPEG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    jpeg: bytes
    width: int
    height: int
    camera_id: str
    timestamp_ms: int
    file_name: str
    def __init__(self, jpeg: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., camera_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., file_name: _Optional[str] = ...) -> None: ...
