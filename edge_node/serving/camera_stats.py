"""The node's per-camera colour statistics (`[camera-norm]`): which crops they count, on disk.

Why a ledger of ids: `common.camera_norm.CameraStats` is a running sum, so adding a crop
twice (the embedder and a re-index both load it) or never (a crash between ingest and the
next save) would skew its camera's gains for good. This object remembers which catalog
ids it has counted, so every crop is counted once however often it is loaded, and after a
restart the ids it lacks are simply counted again. A missing or unreadable file is the
same case with nothing counted: the statistics are recomputed from the gallery in the
background (a warning says so), never a failed start.

The file is `<data-dir>/index/camera_stats.json`, written by `IndexStore` right after the
index, so it counts at least the crops the saved index holds (a crop is counted when it is
loaded, before its vector reaches the index). It is separate from the index's own
metadata, which records the gains the index was built with (`CameraNorm`): the statistics
move on with every crop, the gains of an index stay what they were.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from common.camera_norm import CameraNorm, CameraStats, image_stats
from edge_node.config import CameraNormSettings

from .indexer import write_atomically

log = logging.getLogger(__name__)

STATS_FILE = "camera_stats.json"


def refit_due(active: CameraNorm, fitted: CameraNorm, refit_change: float) -> bool:
    """Whether `fitted` (from the current statistics) should replace the `active` gains:
    a camera gained or lost gains (reached `min-images`), or one drifted by more than
    `refit_change` (relative, `CameraNorm.max_change`, which is 1.0 for a camera only one
    of them has; `refit-change` is below 1)."""
    return active.max_change(fitted) > refit_change


class GalleryCameraStats:
    """`CameraStats` over this node's gallery, with the catalog ids they count. Thread-safe:
    the embedder and a re-index thread both observe the crops they load."""

    def __init__(self, stats: CameraStats | None = None, counted: Iterable[int] = ()) -> None:
        self._lock = threading.Lock()
        self._stats = stats if stats is not None else CameraStats()
        self._counted: set[int] = {int(i) for i in counted}
        self._counted_cache: np.ndarray | None = None

    # ------------------------------------------------------------------ counting
    def observe(self, image_id: int, camera_id: str, img: Image.Image) -> bool:
        """Count one crop (as loaded, before any normalisation) unless already counted;
        True when it was added."""
        image_id = int(image_id)
        if image_id in self._counted:  # the usual case on a re-index: skip the mean
            return False
        stats = image_stats(img)
        with self._lock:
            if image_id in self._counted:
                return False
            self._stats.add(camera_id, stats)
            self._counted.add(image_id)
            self._counted_cache = None
        return True

    def uncounted(self, ids: np.ndarray) -> np.ndarray:
        """The ids of `ids` (ascending int64) not counted yet."""
        with self._lock:
            if self._counted_cache is None:
                self._counted_cache = np.fromiter(self._counted, np.int64, len(self._counted))
            counted = self._counted_cache
        return np.setdiff1d(np.asarray(ids, dtype=np.int64), counted)

    def __len__(self) -> int:
        return len(self._counted)

    def norm(self, settings: CameraNormSettings) -> CameraNorm:
        """The transform the statistics give now, as `[camera-norm]` asks (cameras with
        `min-images` crops or more; levels or gains only)."""
        with self._lock:
            return self._stats.norm(settings.min_images, levels=settings.levels)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats.counts)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        """Write the statistics and the ids they count (tmp + fsync + rename)."""
        with self._lock:
            data = {"stats": self._stats.to_dict(), "counted": _ranges(sorted(self._counted))}
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / STATS_FILE, json.dumps(data).encode())

    @classmethod
    def load(cls, directory: Path, gallery_size: int) -> GalleryCameraStats:
        """The saved statistics; empty ones (to be recomputed from the gallery by the
        embedder, with a warning) when the file is missing or unreadable."""
        path = directory / STATS_FILE
        if not path.is_file():
            if gallery_size:
                log.warning(
                    "no camera statistics at %s; recomputing them from the %d gallery images",
                    path, gallery_size,
                )  # fmt: skip
            return cls()
        try:
            stats, counted = _parse(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            log.warning(
                "camera statistics %s unreadable (%s); recomputing them from the %d gallery "
                "images", path, err, gallery_size,
            )  # fmt: skip
            return cls()
        return cls(stats, counted)


def _parse(data: object) -> tuple[CameraStats, list[int]]:
    """(stats, counted ids) from the file's JSON, or ValueError saying what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("stats"), dict):
        raise ValueError("not a camera statistics object")
    try:
        stats = CameraStats.from_dict(data["stats"])
    except (TypeError, AttributeError) as err:  # a value of the wrong JSON type
        raise ValueError(f"camera statistics malformed: {err}") from err
    if any(not np.isfinite(v).all() or (v < 0).any() for v in stats.sums.values()):
        raise ValueError("camera statistics hold negative or non-finite sums")
    spans = data.get("counted")
    if not isinstance(spans, list) or not all(
        isinstance(s, list) and len(s) == 2 and all(type(x) is int for x in s) and s[0] <= s[1]
        for s in spans
    ):
        raise ValueError("counted ids must be a list of [first, last] id ranges")
    if any(a[1] >= b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError("counted id ranges must be ascending and disjoint")
    images = sum(stats.counts.values())
    total = sum(last - first + 1 for first, last in spans)  # before expanding: a bad file
    if images != total:  # could name a billion ids
        raise ValueError(f"{images} images in the sums but {total} counted ids")
    return stats, [i for first, last in spans for i in range(first, last + 1)]


def _ranges(ids: list[int]) -> list[list[int]]:
    """Ascending ids as inclusive [first, last] runs: a gallery's ids are mostly one run."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return spans
