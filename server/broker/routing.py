"""Which nodes a camera-filtered query goes to, and with which camera ids.

A camera lives on one node, so an operator's camera filter names cameras of several nodes
at once, while a node rejects camera ids it does not hold (INVALID_ARGUMENT). The broker
therefore routes, as Elasticsearch's can_match phase does for shards: each node gets only
its own cameras from the filter, and a node holding none of them is skipped (reported in
coverage as `skipped`, not as a failure). Camera lists come from the nodes' `Status`,
refreshed by the registry's health checks; a node whose cameras are not known yet gets the
filter unchanged and answers for itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import InvalidQuery, name_some


@dataclass(frozen=True)
class Route:
    send: dict[str, list[str]]  # node id -> camera ids to send ([] = no camera filter)
    skipped: list[str]  # node ids that hold none of the requested cameras


def route_cameras(
    node_cameras: Mapping[str, Sequence[str] | None], camera_ids: Sequence[str]
) -> Route:
    """Split `camera_ids` over the nodes (in their given order).

    `node_cameras` maps each selected node to its known cameras, or None when unknown.
    Raises InvalidQuery when every node's cameras are known and some requested camera is on
    none of them (the operator mistyped it, or filtered to the wrong nodes).
    """
    if not camera_ids:
        return Route({node_id: [] for node_id in node_cameras}, [])
    send: dict[str, list[str]] = {}
    skipped: list[str] = []
    seen: set[str] = set()
    all_known = True
    for node_id, cameras in node_cameras.items():
        if cameras is None:
            all_known = False
            send[node_id] = list(camera_ids)
            continue
        held = set(cameras)
        seen |= held
        mine = [c for c in camera_ids if c in held]
        if mine:
            send[node_id] = mine
        else:
            skipped.append(node_id)
    unknown = sorted(set(camera_ids) - seen)
    if all_known and unknown:
        raise InvalidQuery(
            f"unknown camera id(s) {name_some(unknown)}: no selected node holds them; "
            f"cameras there: {name_some(sorted(seen), limit=10) if seen else 'none yet'}"
        )
    return Route(send, skipped)
