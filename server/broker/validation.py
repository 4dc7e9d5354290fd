"""What the broker refuses before it calls any node: every check names the field and the limit.

Pure functions of the request, the config and the registry's node ids, so a refusal costs
no node call and each rule can be tested without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InvalidQuery, NotFound
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
    if any(not cam.strip() for cam in request.filters.camera_ids):
        raise InvalidQuery("`filters.camera_ids` holds an empty camera id")
    return ValidSearch(text, request.k, deadline_ms / 1000.0)


def select_targets(registry: NodeRegistry, node_ids: Sequence[str]) -> list[NodeClient]:
    """The nodes a query goes to (all when `node_ids` is empty); unknown ids are refused."""
    try:
        return registry.select(node_ids)
    except KeyError as err:
        unknown = err.args[0]
        raise InvalidQuery(f"unknown node id(s) {unknown}; registered: {registry.ids}") from err


def check_thumbnail(request: broker_pb2.BrokerThumbnailRequest, registered: list[str]) -> None:
    """Raises NotFound for an unknown node, InvalidQuery for a bad image id or size."""
    if request.node_id not in registered:
        raise NotFound(f"unknown node id {request.node_id!r}; registered: {registered}")
    if request.image_id <= 0:
        raise InvalidQuery(f"`image_id` must be positive, got {request.image_id}")
    if not 0 <= request.max_side <= MAX_THUMBNAIL_SIDE:
        raise InvalidQuery(f"`max_side` must be 0..{MAX_THUMBNAIL_SIDE}, got {request.max_side}")
