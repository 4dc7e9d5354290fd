"""What the node refuses at its edge: every string and list of a request, bounded by [limits].

Why a module of its own: these checks run before the node does anything with a request
(embeds, searches, writes a file or a catalog row), so an over-long or hostile value costs
nothing and leaves no trace but a log line. They mirror the broker's
`server/broker/validation.py`, and every message names the field, the limit (its config
key) and at most the first few offenders with their count
(`common.errors.name_some`), so it stays short whatever the caller sent.

Per-image *content* problems (an undecodable image, a camera id with a bad character)
are the gallery's (`gallery.check_image`): they reject that image and are counted. A
request whose strings break the limits is refused whole: an image named with 10 MB is
not something to keep a record of.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import InvalidQuery, name_some
from common.rpc.query_id import check_query_id
from edge_node.config import Limits

from .domain import SearchQuery
from .gallery import IngestItem, file_name_problem

_SHOWN = 3  # offenders named in one message


def _item_problem(item: IngestItem, limits: Limits) -> str | None:
    problem = file_name_problem(item.file_name, limits)
    if problem:
        return problem
    if len(item.camera_id) > limits.max_camera_id_chars:
        return (
            f"camera_id has {len(item.camera_id):,} characters "
            f"(max-camera-id-chars {limits.max_camera_id_chars})"
        )
    if len(item.captions) > limits.max_captions:
        return f"{len(item.captions):,} captions (max-captions {limits.max_captions})"
    long = [len(c) for c in item.captions if len(c) > limits.max_caption_chars]
    if long:
        return (
            f"a caption has {max(long):,} characters (max-caption-chars {limits.max_caption_chars})"
        )
    return None


def check_ingest(items: Sequence[IngestItem], limits: Limits) -> None:
    """Raise InvalidQuery, before anything is stored, when the batch or any image's
    strings break the limits."""
    if len(items) > limits.max_ingest_batch:
        raise InvalidQuery(
            f"{len(items)} images in one call exceeds max-ingest-batch "
            f"{limits.max_ingest_batch}; split the request"
        )
    problems = []
    for i, item in enumerate(items):
        problem = _item_problem(item, limits)
        if problem:
            problems.append(f"image #{i}: {problem}")
    if problems:
        shown = "; ".join(problems[:_SHOWN])
        more = f" (+{len(problems) - _SHOWN:,} more)" if len(problems) > _SHOWN else ""
        raise InvalidQuery(
            f"Ingest refused, nothing stored: {len(problems):,} of {len(items):,} images "
            f"break [limits]: {shown}{more}"
        )


def check_search(q: SearchQuery, limits: Limits) -> None:
    """Raise InvalidQuery naming the field when a Search breaks the limits."""
    check_query_id(q.query_id)
    if not 1 <= q.k <= limits.max_k:
        raise InvalidQuery(f"k={q.k} must be between 1 and max-k {limits.max_k}")
    if len(q.text) > limits.max_query_chars:
        raise InvalidQuery(
            f"query text has {len(q.text)} characters; max-query-chars is {limits.max_query_chars}"
        )
    cameras = q.camera_ids
    if len(cameras) > limits.max_camera_ids:
        raise InvalidQuery(
            f"filters.camera_ids has {len(cameras):,} ids; max-camera-ids is "
            f"{limits.max_camera_ids}"
        )
    long = [c for c in cameras if len(c) > limits.max_camera_id_chars]
    if long:
        raise InvalidQuery(
            f"filters.camera_ids: {len(long):,} ids longer than max-camera-id-chars "
            f"{limits.max_camera_id_chars}: {name_some(long, limit=_SHOWN)}"
        )


def check_embed_image(image_id: int, image: bytes) -> None:
    """EmbedImage names exactly one crop: a gallery `image_id` (find similar) or the
    `image` bytes of a calibration probe; raise InvalidQuery otherwise."""
    if image_id and image:
        raise InvalidQuery("EmbedImage: give `image_id` or `image`, not both")
    if not image_id and not image:
        raise InvalidQuery(
            "EmbedImage: give `image_id` (a gallery crop) or `image` (encoded crop bytes)"
        )
