"""The faiss index of one model version: normalised vectors keyed by catalog id.

Why it carries a version: scores are only meaningful between a query and gallery vectors
made by the *same* model + adapter. An index knows the version it was built with, is saved
with it, and on start-up `VectorIndex.load` refuses (returns None for) a file made by
another version, so the node rebuilds instead of mixing. Inner product on L2-normalised
vectors is cosine similarity, higher is better.

Flat is exact and the default. HNSW trades a little recall for sub-millisecond queries on
large galleries. IVF needs training data: it stays flat until it holds 39 x nlist vectors
(faiss's minimum advice), then trains once on what it has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from edge_node.config import IndexSettings

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous), as faiss inner product needs."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


class VectorIndex:
    """A faiss IndexIDMap for one model version. Thread-safe (one lock per index)."""

    def __init__(self, dim: int, settings: IndexSettings, version: str) -> None:
        self.dim = int(dim)
        self.settings = settings
        self.version = version
        self._lock = threading.RLock()
        self._ids: set[int] = set()
        self._id_cache: np.ndarray | None = None
        self._trained_ivf = False
        self._index = faiss.IndexIDMap(self._empty_base(flat=settings.type == "ivf"))

    def _empty_base(self, flat: bool = False) -> faiss.Index:
        s = self.settings
        if s.type == "hnsw" and not flat:
            base = faiss.IndexHNSWFlat(self.dim, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efSearch = s.hnsw_ef_search
            return base
        if s.type == "ivf" and not flat:
            quantizer = faiss.IndexFlatIP(self.dim)
            base = faiss.IndexIVFFlat(quantizer, self.dim, s.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
            base.nprobe = s.ivf_nprobe  # faiss's wrapper keeps `quantizer` referenced
            return base
        return faiss.IndexFlatIP(self.dim)

    # ------------------------------------------------------------------ content
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._ids

    def id_array(self) -> np.ndarray:
        """Ids in the index, ascending (int64)."""
        with self._lock:
            if self._id_cache is None:
                self._id_cache = np.sort(np.fromiter(self._ids, np.int64, count=len(self._ids)))
            return self._id_cache

    @property
    def kind(self) -> str:
        if self.settings.type == "ivf" and not self._trained_ivf:
            return "ivf (flat until trained)"
        return self.settings.type

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add normalised `vectors` under catalog `ids`; ids already present are skipped."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = normalise(vectors)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(
                f"vectors {vectors.shape} do not match {len(ids)} ids x dim {self.dim}"
            )
        with self._lock:
            keep = np.array([int(i) not in self._ids for i in ids], dtype=bool)
            if not keep.any():
                return
            self._index.add_with_ids(vectors[keep], ids[keep])
            self._ids.update(int(i) for i in ids[keep])
            self._id_cache = None
            self._maybe_train_ivf()

    def _maybe_train_ivf(self) -> None:
        s = self.settings
        if s.type != "ivf" or self._trained_ivf or len(self._ids) < 39 * s.ivf_nlist:
            return
        flat = self._index.index
        vectors = flat.reconstruct_n(0, flat.ntotal)
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        base = self._empty_base()
        t0 = time.perf_counter()
        base.train(vectors)
        index = faiss.IndexIDMap(base)
        index.add_with_ids(vectors, ids)
        self._index, self._trained_ivf = index, True
        log.info("IVF index trained on %d vectors in %.1fs", len(ids), time.perf_counter() - t0)

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Top-k (scores, ids) for one query among `allowed` ids (None: all), plus how many
        vectors were eligible. Sorted by score descending, ties by lower id first."""
        query = normalise(np.asarray(query, dtype=np.float32).reshape(1, -1))
        with self._lock:
            if allowed is None:
                searched = len(self._ids)
                params = self._params(None)
            else:
                allowed = np.asarray(allowed, dtype=np.int64)
                searched = int(np.isin(allowed, self.id_array(), assume_unique=True).sum())
                params = self._params(faiss.IDSelectorBatch(allowed))
            if searched == 0:
                return np.zeros(0, np.float32), np.zeros(0, np.int64), 0
            # over-fetch a little so equal scores at the cut are ordered by id, not by chance
            fetch = min(searched, k + 8)
            scores, ids = self._index.search(query, fetch, params=params)
        scores, ids = scores[0], ids[0]
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        order = np.lexsort((ids, -scores))[:k]
        return scores[order], ids[order], searched

    def _params(self, selector: faiss.IDSelector | None) -> faiss.SearchParameters:
        s = self.settings
        if s.type == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=s.hnsw_ef_search)
        if s.type == "ivf" and self._trained_ivf:
            return faiss.SearchParametersIVF(sel=selector, nprobe=s.ivf_nprobe)
        return faiss.SearchParameters(sel=selector)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path, extra: dict | None = None) -> None:
        """Write index + metadata atomically. The metadata carries the version and the
        index file's hash, so a crash between the two writes is detected at load."""
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            blob = faiss.serialize_index(self._index).tobytes()
            meta = {
                "version": self.version,
                "dim": self.dim,
                "type": self.settings.type,
                "trained_ivf": self._trained_ivf,
                "count": len(self._ids),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "saved_ms": int(time.time() * 1000),
                **(extra or {}),
            }
        write_atomically(directory / INDEX_FILE, blob)
        write_atomically(directory / META_FILE, json.dumps(meta, indent=1).encode())

    @classmethod
    def load(
        cls, directory: Path, settings: IndexSettings, version: str, dim: int
    ) -> VectorIndex | None:
        """The saved index if it was built by `version` with this type and dim and is intact;
        None (with the reason logged) when it must be rebuilt."""
        meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
        if not meta_path.is_file() or not index_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            blob = index_path.read_bytes()
        except (OSError, ValueError) as err:
            log.warning("saved index unreadable (%s); rebuilding", err)
            return None
        reasons = []
        if meta.get("version") != version:
            reasons.append(f"built by model version {meta.get('version')!r}, active is {version!r}")
        if meta.get("dim") != dim or meta.get("type") != settings.type:
            reasons.append(
                f"dim/type {meta.get('dim')}/{meta.get('type')} != {dim}/{settings.type}"
            )
        if meta.get("sha256") != hashlib.sha256(blob).hexdigest():
            reasons.append("index file does not match its metadata (interrupted save)")
        if reasons:
            log.info("not reusing saved index: %s", "; ".join(reasons))
            return None
        index = cls(dim, settings, version)
        index._index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        index._ids = {int(i) for i in faiss.vector_to_array(index._index.id_map)}
        index._id_cache = None
        index._trained_ivf = bool(meta.get("trained_ivf"))
        return index


def write_atomically(path: Path, data: bytes) -> None:
    """tmp + fsync + rename. The tmp name is this writer's own (pid and thread, as in
    `gallery.write_files_durably`), so two writers never share a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
