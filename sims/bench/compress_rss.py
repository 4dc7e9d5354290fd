"""Resident memory of a real node daemon serving an export, with and without its text tower.

Started as an operator starts one (`sims.node_process`), onnxruntime backend, loopback
only, with a gallery of small crops that the node embeds and indexes itself; measured as
VmRSS of the daemon's process once every crop is in the index. The gallery is written once
per size under the work folder and shared (read-only) by every measured node.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common.errors import Unavailable
from sims.node_process import start_node_processes, write_node_config

INDEX_TIMEOUT_S = 600.0


def process_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise Unavailable(f"process {pid} has no VmRSS (not Linux, or it exited)")


def _gallery(work: Path, size: int) -> Path:
    from sims.bench.node import fill_gallery

    gallery = work / f"gallery-{size}"
    fill_gallery(gallery, size)
    return gallery


def one_node_rss(export_dir: Path, work: Path, size: int, *, text_tower: bool) -> float:
    """VmRSS (MB) of a node serving `export_dir` once it has indexed `size` crops."""
    gallery = _gallery(work, size)
    root = work / f"node-{export_dir.parent.name}-{export_dir.name}-{int(text_tower)}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    (root / "data" / "gallery").symlink_to(gallery.resolve())
    files = write_node_config(
        root,
        "rss-node",
        model=str(export_dir.resolve()),
        with_token=False,
        adapter_dir="",
        backend="onnxruntime",
        text_tower=text_tower,
    )
    (node,) = start_node_processes([files], ready_timeout_s=180.0)
    try:
        deadline = time.monotonic() + INDEX_TIMEOUT_S
        while node.status().indexed_size < size:
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"node on {export_dir} indexed {node.status().indexed_size} of {size} "
                    f"crops in {INDEX_TIMEOUT_S:.0f} s; log: {node.log_tail(500)}"
                )
            time.sleep(0.5)
        return process_rss_mb(node.proc.pid)
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)


def node_rss(export_dir: Path, work: Path, size: int) -> dict[str, float]:
    """The two memory cells of a `bench compress` row."""
    return {
        "rss_mb": one_node_rss(export_dir, work, size, text_tower=True),
        "rss_mb_vector_only": one_node_rss(export_dir, work, size, text_tower=False),
    }
