"""The node's domain object: gallery + (model, index) generation + background workers.

Why "generation": a query must be encoded by the same model that embedded the gallery it
is searched against. The active `Generation` bundles one backend with the index that this
backend built, and a search reads `self._active` once, so everything it does uses one pair.
A hot swap builds a complete new generation off to the side (re-embedding the gallery with
the new model) and then replaces the reference in one assignment; there is no moment when a
query sees a new text encoder with an old index or the other way round.

Workers (daemon threads, stopped by `close`): the embedder tops up the active index with
newly ingested images in batches; the adapter watcher looks for new adapters; the drop
watcher ingests files from the drop folder. None of them runs on a request's thread.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import FedRetrieveError, InvalidQuery
from edge_node.accel.backend import EmbeddingBackend, load_backend
from edge_node.config import NodeConfig

from .domain import NodeStatus, ReindexState, SearchHit, SearchQuery, SearchResult, Thumbnail
from .dropfolder import DropFolder
from .gallery import Gallery, IngestItem, IngestOutcome
from .hotswap import AdapterCandidate, latest_adapter, read_candidate
from .indexer import META_FILE, VectorIndex
from .metrics import NodeMetrics

log = logging.getLogger(__name__)

BackendFactory = Callable[[Path | None], EmbeddingBackend]


@dataclass(frozen=True)
class Generation:
    """One model and the index it built; only ever used together."""

    backend: EmbeddingBackend
    index: VectorIndex
    adapter: AdapterCandidate | None

    @property
    def version(self) -> str:
        return self.backend.version


class Node:
    """Everything one node serves. Thread-safe; `start` launches workers, `close` stops them."""

    def __init__(
        self,
        config: NodeConfig,
        gallery: Gallery,
        generation: Generation,
        backend_factory: BackendFactory,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.config = config
        self.gallery = gallery
        self.index_dir = config.data_dir / "index"
        self.metrics = metrics or NodeMetrics(config.node_id)
        self._factory = backend_factory
        self._active = generation
        self._embed_lock = threading.Lock()  # one top-up of the active index at a time
        self._swap_lock = threading.Lock()  # one hot swap at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reindex = ReindexState()
        self._refused: set[tuple[str, str]] = set()
        self._failed_ids: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._last_save = time.monotonic()
        self._dirty = False
        gallery.add_listener(lambda _ids: self._wake.set())
        self._publish_version()

    @classmethod
    def open(
        cls,
        config: NodeConfig,
        backend_factory: BackendFactory | None = None,
        metrics: NodeMetrics | None = None,
    ) -> Node:
        """Open the gallery, load the model, and load (or plan to rebuild) the index."""
        factory = backend_factory or (
            lambda adapter: load_backend(config.backend, config.model, adapter, config.device)
        )
        gallery = Gallery(config.data_dir / "gallery", config.limits)
        index_dir = config.data_dir / "index"
        found, adapter = _saved_adapter(index_dir, config.adapter_dir)
        if not found:
            adapter = latest_adapter(config.adapter_dir)
        try:
            backend = factory(adapter.path if adapter else None)
        except FedRetrieveError as err:
            if adapter is None:
                raise
            log.error("adapter %s refused at start (%s); serving the base model", adapter.path, err)
            adapter, backend = None, factory(None)
        index = VectorIndex.load(index_dir, config.index, backend.version, backend.embed_dim)
        if index is not None:
            extra = np.setdiff1d(index.id_array(), gallery.ids())
            if len(extra):  # cannot happen through this code; never serve ids without rows
                log.warning("saved index holds %d ids not in the catalog; rebuilding", len(extra))
                index = None
        if index is None:
            index = VectorIndex(backend.embed_dim, config.index, backend.version)
        missing = len(gallery) - len(index)
        log.info(
            "node %s: %d images, %d indexed (%d to embed), model %s",
            config.node_id, len(gallery), len(index), missing, backend.version,
        )  # fmt: skip
        return cls(config, gallery, Generation(backend, index, adapter), factory, metrics)

    # ------------------------------------------------------------------ requests
    @property
    def active(self) -> Generation:
        return self._active

    def search(self, q: SearchQuery) -> SearchResult:
        t0 = time.perf_counter()
        gen = self._active  # read once: this query uses exactly this (model, index) pair
        limits = self.config.limits
        if not 1 <= q.k <= limits.max_k:
            raise InvalidQuery(f"k={q.k} must be between 1 and max-k {limits.max_k}")
        if len(q.text) > limits.max_query_chars:
            raise InvalidQuery(
                f"query text has {len(q.text)} characters; "
                f"max-query-chars is {limits.max_query_chars}"
            )
        allowed = self.gallery.select_ids(q.camera_ids, q.since_ms, q.until_ms)
        text = q.text.strip()
        if q.vector is not None and q.vector_version == gen.version:
            query = _check_vector(q.vector, gen)
            used_vector = True
        elif text:
            query = gen.backend.encode_text([text])[0]
            used_vector = False
        elif q.vector is not None:
            raise InvalidQuery(
                f"query vector was made by model version {q.vector_version!r} but this node runs "
                f"{gen.version!r}; send the query text too so the node can encode it"
            )
        else:
            raise InvalidQuery("empty query: give a text (or a vector of the node's model version)")
        scores, ids, searched = gen.index.search(query, q.k, allowed)
        hits = []
        for score, image_id in zip(scores.tolist(), ids.tolist(), strict=True):
            rec = self.gallery.get(image_id)
            hits.append(SearchHit(rec.id, rec.camera_id, rec.timestamp_ms, score, rec.file_name))
        return SearchResult(
            hits=hits,
            model_version=gen.version,
            adapter_version=gen.backend.adapter_version,
            gallery_size=len(self.gallery),
            vectors_searched=searched,
            used_vector=used_vector,
            took_ms=(time.perf_counter() - t0) * 1000,
        )

    def ingest(self, items: list[IngestItem]) -> list[IngestOutcome]:
        outcomes = self.gallery.ingest(items)
        accepted = sum(1 for o in outcomes if o.accepted and o.reason != "duplicate")
        self.metrics.ingested.inc(accepted)
        self.metrics.rejected.inc(sum(1 for o in outcomes if not o.accepted))
        self.metrics.gallery_size.set(len(self.gallery))
        return outcomes

    def thumbnail(self, image_id: int, max_side: int = 0) -> Thumbnail:
        limit = self.config.limits.thumbnail_max_side
        if not 0 <= max_side <= limit:
            raise InvalidQuery(f"max_side={max_side} must be between 0 (default) and {limit}")
        rec = self.gallery.get(image_id)
        img = self.gallery.load_image(image_id)
        side = max_side or limit
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return Thumbnail(
            buf.getvalue(), img.width, img.height, rec.camera_id, rec.timestamp_ms, rec.file_name
        )

    def status(self) -> NodeStatus:
        gen = self._active
        r = self._reindex
        notes = [gen.backend.note, f"last adapter refused: {r.last_error}" if r.last_error else ""]
        note = "; ".join(n for n in notes if n)
        return NodeStatus(
            node_id=self.config.node_id,
            gallery_size=len(self.gallery),
            indexed=len(gen.index),
            index_version=gen.index.version,
            model_version=gen.version,
            adapter_version=gen.backend.adapter_version,
            backend=gen.backend.name,
            backend_note=note,
            index_type=gen.index.kind,
            embed_dim=gen.backend.embed_dim,
            rejected_images=self.gallery.rejected_count,
            reindex=ReindexState(r.running, r.done, r.total, r.target_version, r.last_error),
        )

    # ------------------------------------------------------------------ workers
    def start(self) -> None:
        self._spawn("embedder", self._embed_loop)
        if self.config.adapter_dir is not None:
            self._spawn("adapter-watcher", self._adapter_loop)
        if self.config.drop_dir is not None:
            drop = DropFolder(self.config.drop_dir, self.gallery, self.config.drop_settle_s)
            self._spawn("drop-watcher", lambda: self._drop_loop(drop))

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"{self.config.node_id}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _embed_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                with self._embed_lock:
                    added = self._top_up(self._active)
                self._dirty |= added > 0
                if (
                    self._dirty
                    and time.monotonic() - self._last_save >= self.config.index.save_interval_s
                ):
                    self.save_index()
            except Exception:  # keep the worker alive; the error is logged with its traceback
                log.exception("embedding worker failed; retrying in 5 s")
                self._stop.wait(5.0)

    def _top_up(self, gen: Generation, progress: Callable[[int], None] | None = None) -> int:
        """Embed catalog images missing from `gen`'s index, in batches; return how many."""
        pending = np.setdiff1d(self.gallery.ids(), gen.index.id_array(), assume_unique=True)
        pending = [int(i) for i in pending if int(i) not in self._failed_ids]
        batch_size = self.config.index.embed_batch_size
        added = 0
        for start in range(0, len(pending), batch_size):
            if self._stop.is_set():
                break
            ids, images = [], []
            for image_id in pending[start : start + batch_size]:
                try:
                    images.append(self.gallery.load_image(image_id))
                    ids.append(image_id)
                except OSError as err:  # validated at ingest; a disk fault if it happens
                    log.error("image %d unreadable, not indexed: %s", image_id, err)
                    self._failed_ids.add(image_id)
            if ids:
                gen.index.add(np.array(ids, dtype=np.int64), gen.backend.encode_images(images))
                added += len(ids)
            if progress:
                progress(len(ids))
            if gen is self._active:
                self.metrics.indexed.set(len(gen.index))
        return added

    def wait_indexed(self, timeout: float = 60.0) -> bool:
        """Block until every catalog image is in the active index (tests, bench)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gen = self._active
            if (
                len(gen.index) + len(self._failed_ids) >= len(self.gallery)
                and not self._reindex.running
            ):
                return True
            self._wake.set()
            time.sleep(0.05)
        return False

    def _adapter_loop(self) -> None:
        while not self._stop.wait(self.config.adapter_poll_s):
            try:
                self.check_adapter()
            except Exception:
                log.exception("adapter watcher failed; will look again")

    def check_adapter(self) -> bool:
        """Swap to the newest adapter in the adapter dir if it is new; True if swapped."""
        candidate = latest_adapter(self.config.adapter_dir)
        current = self._active.adapter
        if candidate is None or (current is not None and candidate.key == current.key):
            return False
        if candidate.key in self._refused:
            return False
        return self.switch_adapter(candidate)

    def switch_adapter(self, candidate: AdapterCandidate) -> bool:
        """Validate `candidate`, re-embed the gallery into a new index, then swap atomically."""
        with self._swap_lock:
            try:
                backend = self._factory(candidate.path)
            except FedRetrieveError as err:
                self._refused.add(candidate.key)
                self._reindex.last_error = f"{candidate.path.name}: {err}"
                log.error("adapter %s refused: %s", candidate.path, err)
                return False
            new = Generation(
                backend,
                VectorIndex(backend.embed_dim, self.config.index, backend.version),
                candidate,
            )
            log.info("re-indexing %d images for %s", len(self.gallery), backend.version)
            self._reindex = ReindexState(True, 0, len(self.gallery), backend.version, "")
            self.metrics.reindex_total.set(len(self.gallery))
            t0 = time.perf_counter()
            try:
                self._top_up(new, progress=self._count_reindex)
                with self._embed_lock:  # catch up with images ingested meanwhile, then swap
                    self._top_up(new, progress=self._count_reindex)
                    if self._stop.is_set():
                        log.info("shutdown during re-index; keeping %s", self._active.version)
                        return False
                    old, self._active = self._active, new
            finally:
                self._reindex.running = False
            self.metrics.swaps.inc()
            self._publish_version()
            self.save_index()
            log.info(
                "swapped %s -> %s (%d images re-embedded in %.1fs)",
                old.version, new.version, len(new.index), time.perf_counter() - t0,
            )  # fmt: skip
            return True

    def _count_reindex(self, n: int) -> None:
        self._reindex.done += n
        self.metrics.reindex_done.set(self._reindex.done)
        self._reindex.total = max(self._reindex.total, len(self.gallery))

    def _drop_loop(self, drop: DropFolder) -> None:
        while not self._stop.wait(self.config.drop_poll_s):
            try:
                accepted, rejected = drop.scan_once()
                if accepted or rejected:
                    self.metrics.ingested.inc(accepted)
                    self.metrics.rejected.inc(rejected)
                    self.metrics.gallery_size.set(len(self.gallery))
            except Exception:
                log.exception("drop-folder scan failed; will look again")

    def _publish_version(self) -> None:
        gen = self._active
        self.metrics.set_version(self.config.node_id, gen.version, gen.backend.adapter_version)
        self.metrics.gallery_size.set(len(self.gallery))
        self.metrics.indexed.set(len(gen.index))

    def save_index(self) -> None:
        gen = self._active
        adapter = str(gen.adapter.path) if gen.adapter else ""
        gen.index.save(self.index_dir, extra={"adapter": adapter})
        self._last_save, self._dirty = time.monotonic(), False

    def close(self) -> None:
        """Stop workers, persist the index and checkpoint the catalog."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.save_index()
        self.gallery.close()
        self.metrics.close()


def _check_vector(values: np.ndarray, gen: Generation) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32).reshape(-1)
    if vector.shape[0] != gen.backend.embed_dim:
        raise InvalidQuery(
            f"query vector has {vector.shape[0]} values; model {gen.version!r} embeds in "
            f"{gen.backend.embed_dim} dimensions"
        )
    if not np.isfinite(vector).all() or not np.any(vector):
        raise InvalidQuery("query vector must be finite and non-zero")
    return vector


def _saved_adapter(
    index_dir: Path, adapter_dir: Path | None
) -> tuple[bool, AdapterCandidate | None]:
    """(found, adapter) the saved index was built with, if that model still exists. Starting
    with it lets the node serve its saved index at once and hot-swap to a newer adapter in
    the background, instead of re-embedding everything before it can answer."""
    try:
        meta = json.loads((index_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return False, None
    path = meta.get("adapter", "")
    if not path:
        return True, None  # built with the base model
    if adapter_dir is None:
        return False, None
    candidate = read_candidate(Path(path))
    return candidate is not None, candidate
