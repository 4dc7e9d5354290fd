"""The node's saved index (`<data-dir>/index`): loading it at start, saving it, one save at a time.

Why a lock: the embedder saves after a top-up and the swap thread saves after a swap. An
index is two files (the faiss blob and the metadata that carries its hash), so two saves
interleaving could leave one save's blob beside the other's metadata, which the next start
rejects and rebuilds. A save holds the store's lock from reading the active generation to
renaming the last file, so the last save to finish writes the pair that was active then.

With `[camera-norm]` on, the metadata also records the gains the index was built with
(`camera_norm`, part of its version), and the camera statistics are written after the
index (`camera_stats.py`), inside the same lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.camera_norm import CameraNorm
from edge_node.config import IndexSettings

from .camera_stats import GalleryCameraStats
from .generation import Generation
from .hotswap import AdapterCandidate, read_candidate
from .indexer import META_FILE, VectorIndex

log = logging.getLogger(__name__)


class IndexStore:
    """Persistence of the active generation's index. Thread-safe."""

    def __init__(
        self,
        directory: Path,
        save_interval_s: float,
        camera_stats: GalleryCameraStats | None = None,
    ) -> None:
        self.directory = directory
        self._camera_stats = camera_stats  # saved after each index ([camera-norm] on)
        self._save_interval_s = save_interval_s
        self._lock = threading.Lock()  # one save at a time; guards the two fields below
        self._last_save = time.monotonic()
        self._dirty = False  # vectors added since the last save

    def saved_adapter(self, adapter_dir: Path | None) -> tuple[bool, AdapterCandidate | None]:
        """(found, adapter) the saved index was built with, if that model still exists.
        Starting with it lets the node serve its saved index at once and hot-swap to a newer
        adapter in the background, instead of re-embedding everything before it can answer."""
        try:
            meta = json.loads((self.directory / META_FILE).read_text())
        except (OSError, ValueError):
            return False, None
        path = meta.get("adapter", "")
        if not path:
            return True, None  # built with the base model
        if adapter_dir is None:
            return False, None
        candidate = read_candidate(Path(path))
        return candidate is not None, candidate

    def saved_camera_norm(self) -> CameraNorm | None:
        """The colour gains the saved index was built with (no gains when it was built
        without them, or there is none); None when its record of them is unreadable, so
        that index cannot be trusted and is rebuilt."""
        try:
            meta = json.loads((self.directory / META_FILE).read_text())
        except (OSError, ValueError):
            return CameraNorm()  # no usable saved index: `load` finds none either
        data = meta.get("camera_norm") if isinstance(meta, dict) else None
        if data is None:
            return CameraNorm()
        try:
            return CameraNorm.from_dict(data)
        except (ValueError, TypeError, AttributeError) as err:  # a hand-edited or damaged file
            log.warning("saved index's camera gains unreadable (%s); rebuilding it", err)
            return None

    def load(
        self, settings: IndexSettings, version: str, dim: int, catalog_ids: np.ndarray
    ) -> VectorIndex | None:
        """The saved index if `version` built it, it is intact (see `VectorIndex.load`) and
        holds only catalog ids; else None (the caller starts an empty one, which the
        embedder fills)."""
        index = VectorIndex.load(self.directory, settings, version, dim)
        if index is not None:
            extra = np.setdiff1d(index.id_array(), catalog_ids)
            if len(extra):  # cannot happen through this code; never serve ids without rows
                log.warning("saved index holds %d ids not in the catalog; rebuilding", len(extra))
                index = None
        return index

    def note_added(self, count: int) -> bool:
        """Record `count` vectors added to the active index; True when a save is due."""
        with self._lock:
            self._dirty |= count > 0
            return self._dirty and time.monotonic() - self._last_save >= self._save_interval_s

    def save(self, active: Callable[[], Generation]) -> None:
        """Save the index of `active()`, called with the lock held so that saves racing a
        swap end with the newest generation on disk."""
        with self._lock:
            gen = active()
            extra: dict = {"adapter": str(gen.adapter.path) if gen.adapter else ""}
            if gen.norm.gains:
                extra["camera_norm"] = gen.norm.to_dict()
            gen.index.save(self.directory, extra=extra)
            if self._camera_stats is not None:  # after the index: it counts all the index holds
                self._camera_stats.save(self.directory)
            self._last_save, self._dirty = time.monotonic(), False
