"""What the broker refuses before it calls any node: every check names the field and the limit.

Every string and list of a request is bounded here (`max-text-chars`, `max-node-ids`,
`max-camera-ids`, `max-id-chars`), and a message that names caller input names at most
the first few values and their count (`common.errors.name_some`): 5,000 unknown ids must
not become a 320 KB message (over gRPC's metadata limit: RESOURCE_EXHAUSTED, not the
INVALID_ARGUMENT meant).

Pure functions of the request, the config and the registry's node ids, so a refusal costs
no node call and each rule can be tested without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InvalidQuery, NotFound, name_some, short_repr
from protos import broker_pb2
from server.broker.config import BrokerConfig
from server.broker.registry import NodeClient, NodeRegistry

MAX_THUMBNAIL_SIDE = 1024


@dataclass(frozen=True)
class ValidSearch:
    """A Search request that passed `check_search`."""

    text: str  # stripped
    k: int
    budget_s: float  # the request's deadline (or the default), in seconds


def check_search(request: broker_pb2.BrokerSearchRequest, cfg: BrokerConfig) -> ValidSearch:
    """The validated query; raises InvalidQuery naming the field."""
    text = request.text.strip()
    if not text:
        raise InvalidQuery("`text` is empty: describe the person to look for")
    if len(text) > cfg.max_text_chars:
        raise InvalidQuery(f"`text` has {len(text)} characters; the limit is {cfg.max_text_chars}")
    return ValidSearch(text, *_check_scope(request, cfg))


def check_similar(
    request: broker_pb2.SearchSimilarRequest, cfg: BrokerConfig, registered: Sequence[str]
) -> ValidSearch:
    """A find-similar query: the image's node must be registered; the rest as for Search."""
    if request.node_id not in registered:
        raise NotFound(
            f"unknown node id {short_repr(request.node_id)} for the image; registered: "
            f"{name_some(registered, limit=10)}"
        )
    if request.image_id <= 0:
        raise InvalidQuery(f"`image_id` must be positive, got {request.image_id}")
    return ValidSearch("", *_check_scope(request, cfg))


def _check_scope(
    request: broker_pb2.BrokerSearchRequest | broker_pb2.SearchSimilarRequest, cfg: BrokerConfig
) -> tuple[int, float]:
    """(k, deadline in s) after checking k, deadline, time range, node and camera ids."""
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
    if time_range.since_ms and time_range.until_ms and time_range.since_ms > time_range.until_ms:
        raise InvalidQuery(
            f"time range: since ({time_range.since_ms}) is after until ({time_range.until_ms})"
        )
    _check_ids(request.node_ids, "node_ids", cfg.max_node_ids, "max-node-ids", cfg)
    cameras = request.filters.camera_ids
    _check_ids(cameras, "filters.camera_ids", cfg.max_camera_ids, "max-camera-ids", cfg)
    if any(not cam.strip() for cam in cameras):
        raise InvalidQuery("`filters.camera_ids` holds an empty camera id")
    return request.k, deadline_ms / 1000.0


def _check_ids(ids: Sequence[str], field: str, most: int, key: str, cfg: BrokerConfig) -> None:
    if len(ids) > most:
        raise InvalidQuery(f"`{field}` has {len(ids):,} ids; the limit is {most} ({key})")
    long = [i for i in ids if len(i) > cfg.max_id_chars]
    if long:
        raise InvalidQuery(
            f"`{field}`: {len(long):,} ids longer than {cfg.max_id_chars} characters "
            f"(max-id-chars): {name_some(long, limit=3)}"
        )


def select_targets(registry: NodeRegistry, node_ids: Sequence[str]) -> list[NodeClient]:
    """The nodes a query goes to (all when `node_ids` is empty); unknown ids are refused."""
    try:
        return registry.select(node_ids)
    except KeyError as err:
        unknown = err.args[0]
        raise InvalidQuery(
            f"unknown node id(s) {name_some(unknown)}; registered: "
            f"{name_some(registry.ids, limit=10)}"
        ) from err


def check_thumbnail(request: broker_pb2.BrokerThumbnailRequest, registered: list[str]) -> None:
    """Raises NotFound for an unknown node, InvalidQuery for a bad image id or size."""
    if request.node_id not in registered:
        raise NotFound(
            f"unknown node id {short_repr(request.node_id)}; registered: "
            f"{name_some(registered, limit=10)}"
        )
    if request.image_id <= 0:
        raise InvalidQuery(f"`image_id` must be positive, got {request.image_id}")
    if not 0 <= request.max_side <= MAX_THUMBNAIL_SIDE:
        raise InvalidQuery(f"`max_side` must be 0..{MAX_THUMBNAIL_SIDE}, got {request.max_side}")
