"""The node's domain object: gallery + active (model, index) generation + background workers.

`Node` answers requests (search, ingest, thumbnail, status) against the active `Generation`
(see `generation.py`: why a model and its index change together), and ties the rest
together: `workers` (the threads and the embedder), `hotswap` (which adapter, refused ones,
re-index progress), `index_store` (the saved index, one save at a time) and, with
`[camera-norm]`, `camera_stats` (the per-camera colour statistics). Replacing the active
generation is the one thing only `Node` does, for a new adapter (`switch_adapter`) or for
new camera gains (`check_camera_norm`), both through `_rebuild`.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np

from common.camera_norm import CameraNorm
from common.errors import FedRetrieveError, InvalidQuery, TextTowerAbsent, short_repr
from edge_node.accel.backend import load_backend
from edge_node.config import NodeConfig

from .camera_stats import GalleryCameraStats, refit_due
from .domain import EmbeddedImage, NodeStatus, SearchHit, SearchQuery, SearchResult, Thumbnail
from .dropfolder import DropFolder
from .gallery import Gallery, IngestItem, IngestOutcome, Rejected, open_image_data
from .generation import BackendFactory, Generation, index_version
from .hotswap import AdapterCandidate, AdapterSwap, latest_adapter
from .index_store import IndexStore
from .indexer import VectorIndex
from .metrics import NodeMetrics
from .validation import check_ingest, check_search
from .workers import Embedder, Workers

__all__ = ["BackendFactory", "Generation", "Node"]

log = logging.getLogger(__name__)


class Node:
    """Everything one node serves. Thread-safe; `start` launches workers, `close` stops them."""

    def __init__(
        self,
        config: NodeConfig,
        gallery: Gallery,
        generation: Generation,
        backend_factory: BackendFactory,
        metrics: NodeMetrics | None = None,
        camera_stats: GalleryCameraStats | None = None,
    ) -> None:
        self.config = config
        self.gallery = gallery
        self.index_dir = config.data_dir / "index"
        self.metrics = metrics or NodeMetrics(config.node_id)
        if not config.camera_norm.enabled:
            camera_stats = None
        elif camera_stats is None:
            camera_stats = GalleryCameraStats.load(self.index_dir, len(gallery))
        self._camera_stats = camera_stats  # None: [camera-norm] off, no statistics kept
        self._store = IndexStore(self.index_dir, config.index.save_interval_s, self._camera_stats)
        self._active = generation  # replaced only by `_rebuild`, holding the embed lock
        self._workers = Workers(config.node_id)
        self._embedder = Embedder(
            gallery, config.index.embed_batch_size, self._workers.stopping, self._camera_stats
        )
        self._swap = AdapterSwap(backend_factory, config.index)
        gallery.add_listener(lambda _ids: self._embedder.wake())
        self._publish_version()

    @classmethod
    def open(
        cls,
        config: NodeConfig,
        backend_factory: BackendFactory | None = None,
        metrics: NodeMetrics | None = None,
    ) -> Node:
        """Open the gallery, load the model, and load (or plan to rebuild) the index; with
        `[camera-norm]`, also the camera statistics and the gains the saved index was built
        with (a new index starts with the gains the statistics give now)."""
        factory = backend_factory or (
            lambda adapter: load_backend(
                config.backend, config.model, adapter, config.device, text_tower=config.text_tower
            )
        )
        gallery = Gallery(config.data_dir / "gallery", config.limits)
        store = IndexStore(config.data_dir / "index", config.index.save_interval_s)
        found, adapter = store.saved_adapter(config.adapter_dir)
        if not found:
            adapter = latest_adapter(config.adapter_dir)
        try:
            backend = factory(adapter.path if adapter else None)
        except FedRetrieveError as err:
            if adapter is None:
                raise
            log.error("adapter %s refused at start (%s); serving the base model", adapter.path, err)
            adapter, backend = None, factory(None)
        stats, norm = None, CameraNorm()
        if config.camera_norm.enabled:
            stats = GalleryCameraStats.load(store.directory, len(gallery))
            norm = store.saved_camera_norm()
        index = None
        if norm is not None:
            version = index_version(backend.version, norm)
            index = store.load(config.index, version, backend.embed_dim, gallery.ids())
        if index is None:
            norm = stats.norm(config.camera_norm) if stats else CameraNorm()
            version = index_version(backend.version, norm)
            index = VectorIndex(backend.embed_dim, config.index, version)
        missing = len(gallery) - len(index)
        log.info(
            "node %s: %d images, %d indexed (%d to embed), model %s, index %s",
            config.node_id, len(gallery), len(index), missing, backend.version, index.version,
        )  # fmt: skip
        generation = Generation(backend, index, adapter, norm)
        return cls(config, gallery, generation, factory, metrics, stats)

    # ------------------------------------------------------------------ requests
    @property
    def active(self) -> Generation:
        return self._active

    def search(self, q: SearchQuery) -> SearchResult:
        t0 = time.perf_counter()
        gen = self._active  # read once: this query uses exactly this (model, index) pair
        check_search(q, self.config.limits)  # strings, lists, k: before any work
        allowed = self.gallery.select_ids(q.camera_ids, q.since_ms, q.until_ms)
        text = q.text.strip()
        if q.vector is not None and q.vector_version in (gen.version, gen.query_version):
            query = _check_vector(q.vector, gen)
            used_vector = True
        elif not gen.backend.text_tower and (text or q.vector is not None):
            raise TextTowerAbsent(_vector_only_refusal(self.config.node_id, gen, q))
        elif text:
            query = gen.backend.encode_text([text])[0]
            used_vector = False
        elif q.vector is not None:
            raise InvalidQuery(
                f"query vector was made by model version {q.vector_version!r} but this node runs "
                f"{_accepted_versions(gen)}; send the query text too so the node can encode it"
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
            query_version=gen.query_version,
        )

    def ingest(self, items: list[IngestItem]) -> list[IngestOutcome]:
        check_ingest(items, self.config.limits)  # refused whole before anything is stored
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

    def embed_image(self, image_id: int) -> EmbeddedImage:
        """One gallery crop embedded by the active generation, for a find-similar query:
        the vector leaves the node, the image does not."""
        rec = self.gallery.get(image_id)  # NotFound for an unknown id
        gen = self._active  # read once: a swap may replace it meanwhile
        crop = gen.norm.apply(self.gallery.load_image(image_id), rec.camera_id)
        vector = gen.backend.encode_images([crop])[0]
        return EmbeddedImage(
            np.asarray(vector, dtype=np.float32), gen.version, rec.camera_id, rec.timestamp_ms
        )

    def embed_crop(self, data: bytes) -> EmbeddedImage:
        """A crop the caller sent embedded by the active generation and not stored: the
        broker's calibration probe, which compares a student's image embeddings with its own
        model's. Checked as an ingested image is (`open_image_data`, [limits]); embedded as
        is, without camera gains, since it comes from none of this node's cameras."""
        try:
            img = open_image_data(data, self.config.limits)
        except Rejected as err:
            raise InvalidQuery(f"EmbedImage: `image` refused: {err}") from err
        gen = self._active
        vector = gen.backend.encode_images([img.convert("RGB")])[0]
        return EmbeddedImage(np.asarray(vector, dtype=np.float32), gen.version, "", 0)

    def status(self) -> NodeStatus:
        gen = self._active
        r = self._swap.progress.snapshot()
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
            reindex=r,
            camera_norm_version=gen.norm.version if self._camera_stats is not None else "",
            vector_only=not gen.backend.text_tower,
            query_version=gen.query_version,
        )

    # ------------------------------------------------------------------ workers
    def start(self) -> None:
        cfg = self.config
        self._workers.spawn("embedder", lambda: self._embedder.run(self._embed_new))
        if cfg.adapter_dir is not None:
            self._workers.every(
                "adapter-watcher", cfg.adapter_poll_s, self.check_adapter, "adapter watcher"
            )
        if self._camera_stats is not None:
            self._workers.every(
                "camera-norm", cfg.adapter_poll_s, self.check_camera_norm, "camera gains check"
            )
        if cfg.drop_dir is not None:
            drop = DropFolder(cfg.drop_dir, self.gallery, cfg.drop_settle_s)
            self._workers.every(
                "drop-watcher", cfg.drop_poll_s, lambda: self._scan(drop), "drop-folder scan"
            )

    def _embed_new(self) -> None:
        """One embedder round: top up the active index, count a batch of indexed crops the
        camera statistics lack (only after they were lost), then save when a save is due."""
        with self._embedder.lock:
            gen = self._active
            added = self._embedder.top_up(
                gen, progress=lambda _n: self.metrics.indexed.set(len(gen.index))
            )
        counted = self._embedder.count_indexed(gen, limit=8 * self.config.index.embed_batch_size)
        if counted:
            self._embedder.wake()  # more to count: next round at once, new crops first
        if self._store.note_added(added + counted):
            self.save_index()

    def _scan(self, drop: DropFolder) -> None:
        accepted, rejected = drop.scan_once()
        if accepted or rejected:
            self.metrics.ingested.inc(accepted)
            self.metrics.rejected.inc(rejected)
            self.metrics.gallery_size.set(len(self.gallery))

    def wait_indexed(self, timeout: float = 60.0) -> bool:
        """Block until every catalog image is in the active index and counted in the camera
        statistics (tests, bench)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gen = self._active
            if (
                len(gen.index) + self._embedder.failed_count >= len(self.gallery)
                and not self._swap.progress.running
                and not self._embedder.stats_behind(gen)
            ):
                return True
            self._embedder.wake()
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ adapter swap
    def check_adapter(self) -> bool:
        """Swap to the newest adapter in the adapter dir if it is new; True if swapped."""
        candidate = latest_adapter(self.config.adapter_dir)
        with self._swap.lock:  # decided under the lock: two callers never swap to one twice
            if not self._swap.wanted(candidate, self._active.adapter):
                return False
            return self._switch(candidate)

    def switch_adapter(self, candidate: AdapterCandidate) -> bool:
        """Validate `candidate`, re-embed the gallery into a new index, then swap atomically."""
        with self._swap.lock:
            return self._switch(candidate)

    def _switch(self, candidate: AdapterCandidate) -> bool:
        gen = self._active  # the new model re-embeds everything: with the newest gains too
        fitted = self._fitted_norm(gen)
        new = self._swap.prepare(candidate, gen.norm if fitted is None else fitted)
        if new is None:
            return False
        return self._rebuild(new)

    # ------------------------------------------------------------------ camera gains re-fit
    def check_camera_norm(self) -> bool:
        """Re-fit the camera gains: when the statistics' gains differ from the active ones
        (a camera reached `min-images`, or a gain drifted by more than `refit-change`),
        re-embed the gallery with them off to the side and swap, as for an adapter; True if
        swapped. Run on a timer (`adapter-poll-s`), never per ingest."""
        if self._camera_stats is None:
            return False
        with self._swap.lock:
            gen = self._active
            fitted = self._fitted_norm(gen)
            if fitted is None or not refit_due(
                gen.norm, fitted, self.config.camera_norm.refit_change
            ):
                return False
            log.info(
                "camera gains %s -> %s (largest change %.3f, cameras with gains: %s)",
                gen.norm.version, fitted.version, gen.norm.max_change(fitted),
                ", ".join(sorted(fitted.gains)) or "none",
            )  # fmt: skip
            version = index_version(gen.version, fitted)
            index = VectorIndex(gen.backend.embed_dim, self.config.index, version)
            return self._rebuild(Generation(gen.backend, index, gen.adapter, fitted))

    def _fitted_norm(self, gen: Generation) -> CameraNorm | None:
        """The gains the camera statistics give now; None without `[camera-norm]`, or while
        the statistics are still being recomputed (they lack crops `gen` holds)."""
        if self._camera_stats is None or self._embedder.stats_behind(gen):
            return None
        return self._camera_stats.norm(self.config.camera_norm)

    # ------------------------------------------------------------------ the swap itself
    def _rebuild(self, new: Generation) -> bool:
        """Embed the gallery into `new` (empty) off to the side, catch up, then make it the
        active generation in one assignment; called with the swap lock held."""
        progress = self._swap.progress
        log.info("re-indexing %d images for %s", len(self.gallery), new.index.version)
        progress.begin(len(self.gallery), new.index.version)
        self.metrics.reindex_total.set(len(self.gallery))

        def count(n: int) -> None:
            self.metrics.reindex_done.set(progress.advance(n, len(self.gallery)))

        t0 = time.perf_counter()
        try:
            self._embedder.top_up(new, progress=count)
            with self._embedder.lock:  # catch up with images ingested meanwhile, then swap
                self._embedder.top_up(new, progress=count)
                if self._workers.stopping.is_set():
                    log.info("shutdown during re-index; keeping %s", self._active.index.version)
                    return False
                old, self._active = self._active, new
        finally:
            progress.end()
        self.metrics.swaps.inc()
        self._publish_version()
        self.save_index()
        log.info(
            "swapped %s -> %s (%d images re-embedded in %.1fs)",
            old.index.version, new.index.version, len(new.index), time.perf_counter() - t0,
        )  # fmt: skip
        return True

    # ------------------------------------------------------------------ persistence, close
    def _publish_version(self) -> None:
        gen = self._active
        self.metrics.set_version(self.config.node_id, gen.version, gen.backend.adapter_version)
        self.metrics.gallery_size.set(len(self.gallery))
        self.metrics.indexed.set(len(gen.index))

    def save_index(self) -> None:
        """Save the active index (serialised with every other save; see `IndexStore`)."""
        self._store.save(lambda: self._active)

    def close(self) -> None:
        """Stop workers, persist the index and checkpoint the catalog."""
        self._workers.stopping.set()  # before the wake: the embedder wakes to find it set
        self._embedder.wake()
        self._workers.stop(timeout_s=30)
        self.save_index()
        self.gallery.close()
        self.metrics.close()


def _accepted_versions(gen: Generation) -> str:
    """The query-vector versions `gen` accepts, for a refusal message: its own, and a
    student's teacher's too."""
    if gen.query_version == gen.version:
        return repr(gen.version)
    return f"{gen.version!r} (a student of {gen.query_version!r}, whose vectors it also takes)"


def _vector_only_refusal(node_id: str, gen: Generation, q: SearchQuery) -> str:
    """Why a vector-only node cannot answer `q`, and what it needs instead."""
    sent = (
        f"; the vector sent is of model version {short_repr(q.vector_version)}"
        if q.vector is not None
        else ""
    )
    return (
        f"node {node_id} serves vector queries only (text-tower = false): send a query "
        f"vector of model version {_accepted_versions(gen)}{sent}"
    )


def _check_vector(values: np.ndarray, gen: Generation) -> np.ndarray:
    """The query vector scaled to unit length, or InvalidQuery.

    Checked after normalising, in float64: a finite float32 vector with huge components
    (3e38) overflows float32 on the way (its squared norm is inf), and the index would
    score every image 0.0; one with tiny components would underflow to zero.
    """
    vector = np.asarray(values, dtype=np.float32).reshape(-1)
    if vector.shape[0] != gen.backend.embed_dim:
        raise InvalidQuery(
            f"query vector has {vector.shape[0]} values; model {gen.version!r} embeds in "
            f"{gen.backend.embed_dim} dimensions"
        )
    wide = vector.astype(np.float64)
    norm = float(np.linalg.norm(wide)) if np.isfinite(wide).all() else float("nan")
    if not (np.isfinite(norm) and norm > 0):
        raise InvalidQuery("query vector must be finite and non-zero")
    unit = (wide / norm).astype(np.float32)
    if not (np.isfinite(unit).all() and abs(float(np.linalg.norm(unit)) - 1.0) < 1e-3):
        raise InvalidQuery("query vector cannot be normalised to unit length")
    return unit
