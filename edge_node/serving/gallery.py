"""The node's gallery: image files under the data dir plus a SQLite (WAL) catalog.

Why this shape: a node is killed without warning (power cut, OOM killer, SIGKILL), so the
invariant is written into the order of operations. An image is validated, written to a
temporary file, renamed into place and flushed to disk (syncfs for a whole batch, else
fsync of file and directory) *before* its catalog row commits; an ingest is acknowledged
only after that commit. So a catalog row always has its file, and an acknowledged image is
never lost. A crash in between leaves at most an unreferenced file, which opening the
gallery removes. Files are named by content hash, which also
makes ingest idempotent: a retried image gets its existing id back.

The catalog is mirrored in memory (append-only) so searches can filter by camera and time
without touching SQLite.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import threading
import time
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import InvalidQuery, NotFound, name_some, short_repr
from edge_node.config import Limits

log = logging.getLogger(__name__)

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
CAMERA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch; length: [limits]
# Unicode categories never allowed in a printable file name: controls (terminal escape
# sequences start with one), format characters (bidi overrides that reorder what a
# terminal shows), surrogates, private use, unassigned, line and paragraph separators.
_UNPRINTABLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
_PORTABLE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def file_name_problem(name: str, limits: Limits) -> str | None:
    """Why `name` is not an acceptable ImageItem.file_name, or None ("" is fine: the
    gallery then names the image after its content hash)."""
    if len(name) > limits.max_file_name_chars:
        limit = limits.max_file_name_chars
        return f"file_name has {len(name):,} characters (max-file-name-chars {limit})"
    if limits.file_name_charset == "portable":
        bad = [c for c in name if c not in _PORTABLE]
    else:
        bad = [c for c in name if c == "\\" or unicodedata.category(c) in _UNPRINTABLE]
    if bad:
        return (
            f"file_name {short_repr(name)} has characters outside file-name-charset "
            f"{limits.file_name_charset!r}: {name_some(sorted(set(bad)), limit=3)}"
        )
    # "/" may separate folders of a camera's export ("c01/0002.jpg"): the catalog stores
    # images by content hash, never by this name; but a name is never absolute and never
    # climbs out, so a tool that writes files named after hits cannot be led astray
    if name.startswith("/") or ".." in name.split("/"):
        return f"file_name {short_repr(name)} must be a relative name without '..' parts"
    return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: faiss ids are catalog ids
    path TEXT NOT NULL,                    -- relative to the gallery root
    camera_id TEXT NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    captions TEXT NOT NULL,                -- JSON list
    checksum TEXT NOT NULL UNIQUE,         -- sha256 of the file bytes
    file_name TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    ingested_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    file_name TEXT NOT NULL,
    camera_id TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ImageRecord:
    """One catalog row."""

    id: int
    path: str
    camera_id: str
    timestamp_ms: int
    captions: tuple[str, ...]
    checksum: str
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class IngestItem:
    """One image offered to the gallery (from the RPC or the drop folder)."""

    data: bytes
    camera_id: str
    timestamp_ms: int
    captions: tuple[str, ...] = ()
    file_name: str = ""


@dataclass(frozen=True)
class IngestOutcome:
    image_id: int  # 0 when rejected
    accepted: bool
    reason: str = ""  # why rejected, or "duplicate" for an image already in the catalog


class Rejected(Exception):
    """An offered image is unusable; the message is the reason given back to the caller."""


def check_image(item: IngestItem, limits: Limits) -> tuple[str, int, int]:
    """Validate one offered image; return (format, width, height) or raise Rejected."""
    cam_limit = limits.max_camera_id_chars
    if not (len(item.camera_id) <= cam_limit and CAMERA_ID.fullmatch(item.camera_id or "")):
        raise Rejected(
            f"camera id {short_repr(item.camera_id)} must be 1-{cam_limit} of [A-Za-z0-9_.-]"
        )
    problem = file_name_problem(item.file_name, limits)
    if problem:
        raise Rejected(problem)
    if item.timestamp_ms < 0:
        raise Rejected(f"timestamp_ms {item.timestamp_ms} is negative")
    if len(item.captions) > limits.max_captions or any(
        len(c) > limits.max_caption_chars for c in item.captions
    ):
        raise Rejected(
            f"at most {limits.max_captions} captions of {limits.max_caption_chars} characters"
        )
    img = open_image_data(item.data, limits)
    return img.format, img.width, img.height


def open_image_data(data: bytes, limits: Limits) -> Image.Image:
    """Decode encoded image bytes, fully, under the [limits] an ingested image meets
    (size, pixels, accepted formats, no truncation); raise Rejected naming the problem.
    Ingest and the broker's calibration probe (`Node.embed_crop`) both come through here."""
    if not data:
        raise Rejected("empty file")
    if len(data) > limits.max_image_bytes:
        raise Rejected(f"{len(data)} bytes exceeds max-image-bytes {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, (width, height) = img.format, img.size
            if fmt not in FORMATS:
                raise Rejected(f"format {fmt} not accepted (use {', '.join(FORMATS)})")
            if width * height > limits.max_image_pixels:
                raise Rejected(
                    f"{width}x{height} exceeds max-image-pixels {limits.max_image_pixels}"
                )
            img.load()  # full decode: catches truncated and corrupt files
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected(f"too many pixels: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise Rejected("not an image (unrecognised format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise Rejected(f"corrupt image: {err}") from err
    if width < 1 or height < 1:
        raise Rejected(f"degenerate size {width}x{height}")
    return img


def _stored(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars`, unprintable characters escaped (for the rejections log)."""
    return "".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _UNPRINTABLE else c
        for c in text[:max_chars]
    )


@functools.cache
def _syncfs_function():
    """libc's syncfs (Linux): one flush for a whole batch instead of two fsyncs per file.
    None where there is none. Looked up on first use, then remembered for the process."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


def write_files_durably(files: Sequence[tuple[Path, bytes]], root: Path) -> None:
    """Write each (path, data) as tmp + rename; on return every file and its directory
    entry are on disk (syncfs of the file system, or fsync of each file and directory)."""
    syncfs = _syncfs_function()
    per_file = syncfs is None
    for path, data in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            if per_file:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    dirs = {path.parent for path, _ in files} if per_file else {root}
    for folder in dirs:
        fd = os.open(folder, os.O_RDONLY)
        try:
            if per_file:
                os.fsync(fd)
            elif syncfs(fd) != 0:
                raise OSError(ctypes_errno(), f"syncfs failed on {root}")
        finally:
            os.close(fd)


def ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()


def read_catalog(root: Path, timeout_s: float = 10.0) -> list[ImageRecord]:
    """A consistent snapshot of the catalog of the gallery at `root`, read from another
    process while the node daemon may be ingesting (the Flower ClientApp training on the
    node's own crops). WAL lets one writer and many readers run at once: this reader sees
    the rows committed when its transaction began, each of which already has its file
    (see the module docstring), and never takes the write lock, so ingest is not blocked.
    """
    path = Path(root) / "catalog.sqlite"
    if not path.is_file():
        raise NotFound(f"no gallery at {root} (expected {path.name}; is this a node data dir?)")
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    try:
        db.execute("PRAGMA query_only = ON")
        rows = db.execute(
            "SELECT id, path, camera_id, timestamp_ms, captions, checksum, file_name, width, height"
            " FROM images ORDER BY id"
        ).fetchall()
    finally:
        db.close()
    return [ImageRecord(*row[:4], tuple(json.loads(row[4])), *row[5:]) for row in rows]


class Gallery:
    """Catalog + files of one node. Thread-safe; ingest is serialised, reads are lock-light."""

    def __init__(self, root: Path, limits: Limits) -> None:
        self.root = Path(root)
        self.limits = limits
        self.images_dir = self.root / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.root / "catalog.sqlite", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged ingest survives power loss
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._records: dict[int, ImageRecord] = {}
        self._by_checksum: dict[str, int] = {}
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._columns_lists: tuple[list[int], list[int], list[int]] = ([], [], [])
        self._camera_codes: dict[str, int] = {}
        self._listeners: list[Callable[[list[int]], None]] = []
        self._load()
        self._remove_orphans()

    # ------------------------------------------------------------------ start-up
    def _load(self) -> None:
        rows = self._db.execute(
            "SELECT id, path, camera_id, timestamp_ms, captions, checksum, file_name, width, height"
            " FROM images ORDER BY id"
        ).fetchall()
        missing = []
        for row in rows:
            rec = ImageRecord(*row[:4], tuple(json.loads(row[4])), *row[5:])
            if not (self.root / rec.path).is_file():
                missing.append(rec)
                continue
            self._remember(rec)
        for rec in missing:  # cannot happen through this code; say so loudly if a disk lost it
            log.error("catalog row %d lost its file %s; moving it to rejections", rec.id, rec.path)
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("DELETE FROM images WHERE id = ?", (rec.id,))
                self._reject_row(rec.file_name, rec.camera_id, "file missing at start-up")

    def _remove_orphans(self) -> None:
        """Delete files no row references: leftovers of a crash before the catalog commit."""
        known = {rec.path for rec in self._records.values()}
        removed = 0
        for path in self.images_dir.rglob("*"):
            if path.is_file() and str(path.relative_to(self.root)) not in known:
                path.unlink()
                removed += 1
        if removed:
            log.info("removed %d unreferenced image file(s) left by an interrupted ingest", removed)

    def _remember(self, rec: ImageRecord) -> None:
        self._records[rec.id] = rec
        self._by_checksum[rec.checksum] = rec.id
        code = self._camera_codes.setdefault(rec.camera_id, len(self._camera_codes))
        ids, cams, stamps = self._columns_lists  # ids arrive ascending (AUTOINCREMENT)
        ids.append(rec.id)
        cams.append(code)
        stamps.append(rec.timestamp_ms)
        self._arrays = None

    # ------------------------------------------------------------------ ingest
    def add_listener(self, callback: Callable[[list[int]], None]) -> None:
        """Call `callback(new_ids)` after each committed ingest (wakes the embedder)."""
        self._listeners.append(callback)

    def ingest(self, items: Sequence[IngestItem]) -> list[IngestOutcome]:
        """Validate, store and catalog `items`; return one outcome per item, in order."""
        if len(items) > self.limits.max_ingest_batch:
            raise InvalidQuery(
                f"{len(items)} images in one call exceeds max-ingest-batch "
                f"{self.limits.max_ingest_batch}; split the request"
            )
        outcomes: list[IngestOutcome | None] = [None] * len(items)
        pending: list[tuple[int, IngestItem, str, int, int, str]] = []
        rejections: list[tuple[IngestItem, str]] = []
        with self._lock:
            seen: dict[str, int] = {}
            for i, item in enumerate(items):
                try:
                    fmt, width, height = check_image(item, self.limits)
                except Rejected as err:
                    outcomes[i] = IngestOutcome(0, False, str(err))
                    rejections.append((item, str(err)))
                    continue
                checksum = hashlib.sha256(item.data).hexdigest()
                if checksum in self._by_checksum:
                    outcomes[i] = IngestOutcome(self._by_checksum[checksum], True, "duplicate")
                    continue
                if checksum in seen:
                    pending.append((i, item, checksum, width, height, ""))
                    continue
                seen[checksum] = i
                rel = f"images/{checksum[:2]}/{checksum}.{FORMATS[fmt]}"
                pending.append((i, item, checksum, width, height, rel))
            # files first (durably), rows second: a row never exists without its file
            files = [(self.root / rel, item.data) for _, item, _, _, _, rel in pending if rel]
            if files:
                write_files_durably(files, self.images_dir)
            new = self._commit(pending, rejections)
            for i, rec in new:
                outcomes[i] = IngestOutcome(rec.id, True, "")
            for i, _item, checksum, *_ in pending:
                if outcomes[i] is None:  # same bytes twice in one call
                    outcomes[i] = IngestOutcome(self._by_checksum[checksum], True, "duplicate")
        if new:
            ids = [rec.id for _, rec in new]
            for callback in self._listeners:
                callback(ids)
        return [o for o in outcomes if o is not None]

    def _commit(self, pending, rejections) -> list[tuple[int, ImageRecord]]:
        now = int(time.time() * 1000)
        new: list[tuple[int, ImageRecord]] = []
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for i, item, checksum, width, height, rel in pending:
                if not rel:
                    continue
                name = item.file_name or Path(rel).name
                cur = self._db.execute(
                    "INSERT INTO images (path, camera_id, timestamp_ms, captions, checksum,"
                    " file_name, width, height, ingested_ms) VALUES (?,?,?,?,?,?,?,?,?)",
                    (rel, item.camera_id, item.timestamp_ms, json.dumps(list(item.captions)),
                     checksum, name, width, height, now),
                )  # fmt: skip
                rec = ImageRecord(
                    int(cur.lastrowid), rel, item.camera_id, item.timestamp_ms,
                    tuple(item.captions), checksum, name, width, height,
                )  # fmt: skip
                new.append((i, rec))
            for item, reason in rejections:
                self._reject_row(item.file_name, item.camera_id, reason)
        for _, rec in new:  # only after the commit: a search never sees an uncommitted row
            self._remember(rec)
        return new

    def _reject_row(self, file_name: str, camera_id: str, reason: str) -> None:
        # A rejected image's strings are the caller's: kept bounded and on one line (the
        # RPC edge refuses over-long ones before this; the drop folder's come from a disk)
        self._db.execute(
            "INSERT INTO rejections (at_ms, file_name, camera_id, reason) VALUES (?,?,?,?)",
            (int(time.time() * 1000), _stored(file_name, self.limits.max_file_name_chars),
             _stored(camera_id, self.limits.max_camera_id_chars), _stored(reason, 512)),
        )  # fmt: skip

    def record_rejection(self, file_name: str, camera_id: str, reason: str) -> None:
        """Count a file rejected before it reached `ingest` (the drop folder uses this)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._reject_row(file_name, camera_id, reason)

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return len(self._records)

    @property
    def rejected_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0])

    def rejections(self) -> list[tuple[str, str, str]]:
        """(file_name, camera_id, reason) of every rejected image, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT file_name, camera_id, reason FROM rejections ORDER BY id"
            ).fetchall()

    def get(self, image_id: int) -> ImageRecord:
        rec = self._records.get(int(image_id))
        if rec is None:
            raise NotFound(f"image id {image_id} is not in this node's gallery")
        return rec

    def ids(self) -> np.ndarray:
        """Catalog ids, ascending (int64)."""
        return self._columns()[0]

    def cameras(self) -> list[str]:
        return sorted(self._camera_codes)

    def path_of(self, image_id: int) -> Path:
        return self.root / self.get(image_id).path

    def load_image(self, image_id: int) -> Image.Image:
        with Image.open(self.path_of(image_id)) as img:
            return img.convert("RGB")

    def select_ids(
        self, camera_ids: Sequence[str] = (), since_ms: int = 0, until_ms: int = 0
    ) -> np.ndarray | None:
        """Ids passing the filters; None when no filter is set (everything passes)."""
        if not camera_ids and not since_ms and not until_ms:
            return None
        unknown = sorted(set(camera_ids) - set(self._camera_codes))
        if unknown:
            raise InvalidQuery(
                f"unknown camera id(s) {name_some(unknown, plain=True)}; this node has "
                f"{name_some(self.cameras(), limit=10, plain=True) or 'no cameras yet'}"
            )
        if since_ms < 0 or until_ms < 0 or (since_ms and until_ms and since_ms > until_ms):
            raise InvalidQuery(f"bad time range since_ms={since_ms} until_ms={until_ms}")
        ids, cams, stamps = self._columns()
        mask = np.ones(len(ids), dtype=bool)
        if camera_ids:
            mask &= np.isin(cams, [self._camera_codes[c] for c in camera_ids])
        if since_ms:
            mask &= stamps >= since_ms
        if until_ms:
            mask &= stamps <= until_ms
        return ids[mask]

    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays = self._arrays
        if arrays is None:
            with self._lock:
                arrays = tuple(np.array(col, dtype=np.int64) for col in self._columns_lists)
                self._arrays = arrays
        return arrays

    def missing_files(self) -> list[int]:
        """Catalog ids whose image file is absent (should always be empty)."""
        return [i for i, rec in self._records.items() if not (self.root / rec.path).is_file()]

    def close(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
