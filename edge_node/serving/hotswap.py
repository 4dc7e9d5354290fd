"""Adapter hot swap: which adapter should be active, loading it, and the re-index's progress.

Discovery is `common.adapters` (re-exported here), no model code, so the rule for "a new
adapter appeared" stays simple enough to explain to the person copying files by hand, and
testable without a model. The rule:

* `adapter-dir` itself may be an adapter (it holds `fedretrieve_adapter.json`), replaced in
  place by `common.adapters.save_adapter` (which renames a complete directory over it);
* or it holds adapters as sub-directories (`round-3/`, `2024-06-01/`, ...). Names starting
  with "." are ignored (that is where `save_adapter` stages its temporary copies).

The newest candidate wins: highest manifest `round`, then latest manifest mtime, then name.
An adapter is identified by (path, adapter fingerprint), so replacing one in place with new
weights counts as new. A candidate the node refused is not retried until one of its files
changes (name, size or mtime: `common.adapters.files_stamp`), so a directory completed in
place after a first, failed look (a `cp -r` that wrote the manifest before the weights) is
picked up without a restart. Status `backend_note` names the refused adapter and why.

`AdapterSwap` holds the decisions and bookkeeping of a swap (one at a time, refused
candidates, progress); replacing the active generation itself is `Node.switch_adapter`.
A camera-normalisation re-fit (`Node.check_camera_norm`) is the same swap with the same
model and new gains: it takes the same lock and reports the same progress.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from common.adapters import (
    AdapterCandidate,
    FilesStamp,
    files_stamp,
    latest_adapter,
    read_candidate,
)
from common.camera_norm import CameraNorm
from common.errors import FedRetrieveError
from edge_node.config import IndexSettings

from .domain import ReindexState
from .generation import BackendFactory, Generation, index_version
from .indexer import VectorIndex

__all__ = [
    "AdapterCandidate",
    "AdapterSwap",
    "ReindexProgress",
    "latest_adapter",
    "read_candidate",
]

log = logging.getLogger(__name__)


class ReindexProgress:
    """The running (or last) re-index and the last refusal.

    Written by the swapping thread, read by Status and `wait_indexed` on others: every
    change and every read holds the lock, and readers get a copy, never a half-updated one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = ReindexState()

    def snapshot(self) -> ReindexState:
        with self._lock:
            return dataclasses.replace(self._state)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._state.running

    def begin(self, total: int, target_version: str) -> None:
        with self._lock:
            self._state = ReindexState(True, 0, total, target_version, "")

    def advance(self, n: int, gallery_size: int) -> int:
        """Count `n` more images re-embedded (the gallery may have grown); return the count."""
        with self._lock:
            self._state.done += n
            self._state.total = max(self._state.total, gallery_size)
            return self._state.done

    def end(self) -> None:
        with self._lock:
            self._state.running = False

    def refused(self, reason: str) -> None:
        with self._lock:
            self._state.last_error = reason


class AdapterSwap:
    """One hot swap at a time (hold `lock`); refused candidates are remembered with the state
    of their files, and tried again once those change."""

    def __init__(self, factory: BackendFactory, settings: IndexSettings) -> None:
        self.lock = threading.Lock()
        self.progress = ReindexProgress()
        self._factory = factory
        self._settings = settings
        # candidate key -> its files when it was refused; read and written with `lock` held
        self._refused: dict[tuple[str, str], FilesStamp] = {}

    def wanted(self, candidate: AdapterCandidate | None, current: AdapterCandidate | None) -> bool:
        """Whether to swap to `candidate`: it exists, is not active, and was not refused as
        it is now (a refused one whose files changed since is tried again)."""
        if candidate is None or (current is not None and candidate.key == current.key):
            return False
        refused = self._refused.get(candidate.key)
        if refused is None:
            return True
        if refused == files_stamp(candidate.path):
            return False
        del self._refused[candidate.key]
        log.info("adapter %s changed since it was refused; trying it again", candidate.path)
        return True

    def prepare(
        self, candidate: AdapterCandidate, norm: CameraNorm | None = None
    ) -> Generation | None:
        """A new generation (empty index) for `candidate`, feeding it crops normalised with
        `norm` (None: none); None when its model is refused, which is logged, remembered and
        shown in Status."""
        stamp = files_stamp(candidate.path)  # before loading: a change during it means retry
        try:
            backend = self._factory(candidate.path)
        except FedRetrieveError as err:
            self._refused[candidate.key] = stamp
            self.progress.refused(f"{candidate.path} (tried again when its files change): {err}")
            log.error("adapter %s refused: %s", candidate.path, err)
            return None
        norm = norm or CameraNorm()
        version = index_version(backend.version, norm)
        index = VectorIndex(backend.embed_dim, self._settings, version)
        return Generation(backend, index, candidate, norm)
