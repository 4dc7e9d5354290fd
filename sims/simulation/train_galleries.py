"""The simulated sites' own data stores: each node's train crops in a real node daemon.

A real site has no dataset file: a detector sends crops to the node daemon over Ingest, and
the Flower client reads the daemon's gallery while it runs (`edge_node/fl/task.py`,
`gallery=`). With `[federated] from-galleries = true` the simulation does the same: it
starts one `fedretrieve node serve` per node, ingests that node's train crops (label-free
nodes get them without captions, so nothing caption-shaped exists at such a site), waits
until they are indexed, and keeps the daemons running while Flower trains, each simulated
node reading the gallery of its own daemon (run config `gallery-root`). Evaluation and
serving still use the test split (a separate gallery of people no node trained on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from common.datasets import Record
from sims.node_process import start_node_processes, wait_until
from sims.simulation.serving import indexed, ingest, node_files

log = logging.getLogger(__name__)


def label_free_nodes(options: Mapping[str, object], nodes: list[str]) -> set[str]:
    """The nodes a run trains without captions (run config `label-free` / `label-free-nodes`),
    decided as `edge_node.fl.task.is_label_free` decides it on the node."""
    if str(options.get("label-free", False)).lower() in ("1", "true", "yes"):
        return set(nodes)
    named = str(options.get("label-free-nodes", ""))
    return {n.strip() for n in named.split(",") if n.strip()} & set(nodes)


@contextlib.contextmanager
def train_galleries(
    train_by_node: Mapping[str, list[Record]],
    data_root: Path,
    base_model: str,
    out: Path,
    *,
    uncaptioned: set[str],
    camera_norm: bool = False,
    timeout_s: float = 300.0,
) -> Iterator[Path]:
    """Node daemons holding each node's train crops, running for the `with` block.

    Yields the gallery root: `<root>/<node id>/data` is that node's daemon data dir."""
    root = out / "train-galleries"
    size = max(len(v) for v in train_by_node.values())
    files = [
        node_files(nid, root / nid, base_model, max_k=size, camera_norm=camera_norm)
        for nid in sorted(train_by_node)
    ]
    nodes = start_node_processes(files, ready_timeout_s=timeout_s)
    try:
        wait_until("the node daemons to answer Status", lambda: all(n.status(1.0) for n in nodes),
                   timeout_s, nodes)  # fmt: skip
        for node in nodes:
            crops = train_by_node[node.node_id]
            if node.node_id in uncaptioned:
                crops = [dataclasses.replace(r, captions=()) for r in crops]
            ingest(node, crops, data_root)
            log.info("node %s: %d train crops ingested%s", node.node_id, len(crops),
                     " without captions" if node.node_id in uncaptioned else "")  # fmt: skip
        wait_until(
            "the train galleries to be indexed",
            lambda: all(indexed(n, len(train_by_node[n.node_id])) for n in nodes),
            timeout_s,
            nodes,
        )
        yield root
    finally:
        for node in nodes:
            node.stop()
