"""The node's background work: daemon threads, and the embedder that fills an index.

Workers (daemon threads, stopped by `Workers.stop`): the embedder tops up the active index
with newly ingested images in batches; the adapter watcher looks for new adapters; the drop
watcher ingests files from the drop folder. None of them runs on a request's thread, and a
failing round is logged with its traceback and tried again, never ending the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from .camera_stats import GalleryCameraStats
from .gallery import Gallery
from .generation import Generation

log = logging.getLogger(__name__)


class Workers:
    """Named daemon threads that run until `stop`; `stop` joins them."""

    def __init__(self, prefix: str) -> None:
        self.stopping = threading.Event()
        self._prefix = prefix
        self._lock = threading.Lock()  # `spawn` (start) vs `stop` (close) on other threads
        self._threads: list[threading.Thread] = []

    def spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"{self._prefix}-{name}", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def every(self, name: str, interval_s: float, step: Callable[[], None], what: str) -> None:
        """Run `step` every `interval_s` until stopped; a failure is logged as `what` failed."""

        def loop() -> None:
            while not self.stopping.wait(interval_s):
                try:
                    step()
                except Exception:  # keep the worker alive; the error is logged with its traceback
                    log.exception("%s failed; will look again", what)

        self.spawn(name, loop)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stopping.set()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout=timeout_s)


class Embedder:
    """Embeds the catalog images an index lacks, in batches.

    `lock` is held while the active index is topped up, and by a swap while it catches up
    and replaces the active generation, so no ingested image is left out of the new index.

    Each crop is normalised with the generation's camera gains before the backend sees it
    (`Generation.norm`; none without `[camera-norm]`), and, with camera statistics, counted
    in them as loaded: the embedder loads every crop anyway, so the statistics cost one
    mean per crop and no extra read (`camera_stats.py` says why each is counted once).
    """

    def __init__(
        self,
        gallery: Gallery,
        batch_size: int,
        stopping: threading.Event,
        camera_stats: GalleryCameraStats | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self._gallery = gallery
        self._batch_size = batch_size
        self._stopping = stopping
        self._camera_stats = camera_stats
        self._wake = threading.Event()
        self._failed_lock = threading.Lock()  # the embedder and a swap both add
        self._failed: set[int] = set()  # unreadable images: never retried

    def wake(self) -> None:
        self._wake.set()

    @property
    def failed_count(self) -> int:
        with self._failed_lock:
            return len(self._failed)

    def top_up(self, gen: Generation, progress: Callable[[int], None] | None = None) -> int:
        """Embed catalog images missing from `gen`'s index, in batches; return how many.
        `progress(n)` is called after each batch."""
        pending = self._without_failed(
            np.setdiff1d(self._gallery.ids(), gen.index.id_array(), assume_unique=True)
        )
        added = 0
        for start in range(0, len(pending), self._batch_size):
            if self._stopping.is_set():
                break
            ids, images = [], []
            for image_id, camera_id, img in self._load(pending[start : start + self._batch_size]):
                ids.append(image_id)
                images.append(gen.norm.apply(img, camera_id))
            if ids:
                gen.index.add(np.array(ids, dtype=np.int64), gen.backend.encode_images(images))
                added += len(ids)
            if progress:
                progress(len(ids))
        return added

    def stats_behind(self, gen: Generation) -> int:
        """How many crops in `gen`'s index the camera statistics do not count yet (after a
        missing or unreadable statistics file); 0 without statistics."""
        if self._camera_stats is None:
            return 0
        return len(self._without_failed(self._camera_stats.uncounted(gen.index.id_array())))

    def count_indexed(self, gen: Generation, limit: int) -> int:
        """Count up to `limit` crops of `gen`'s index that the camera statistics lack (read
        for that alone: new crops are counted by `top_up`); return how many."""
        if self._camera_stats is None:
            return 0
        ids = self._without_failed(self._camera_stats.uncounted(gen.index.id_array()))[:limit]
        return sum(1 for _ in self._load(ids))

    def _load(self, ids: list[int]) -> Iterator[tuple[int, str, Image.Image]]:
        """(id, camera, crop) for each readable id, counted in the camera statistics; an
        unreadable one is logged and never tried again."""
        for image_id in ids:
            if self._stopping.is_set():
                return
            try:
                img = self._gallery.load_image(image_id)
            except OSError as err:  # validated at ingest; a disk fault if it happens
                log.error("image %d unreadable, not indexed: %s", image_id, err)
                with self._failed_lock:
                    self._failed.add(image_id)
                continue
            camera_id = self._gallery.get(image_id).camera_id
            if self._camera_stats is not None:
                self._camera_stats.observe(image_id, camera_id, img)
            yield image_id, camera_id, img

    def _without_failed(self, ids: np.ndarray) -> list[int]:
        with self._failed_lock:
            return [int(i) for i in ids if int(i) not in self._failed]

    def run(self, step: Callable[[], None]) -> None:
        """The embedder thread: `step` whenever woken (or every second) until stopped."""
        while not self._stopping.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                step()
            except Exception:  # keep the worker alive; the error is logged with its traceback
                log.exception("embedding worker failed; retrying in 5 s")
                self._stopping.wait(5.0)
