"""Ingest from a drop folder that a detector pipeline writes camera crops into.

Layout: `<drop>/<camera_id>/<any name>.<jpg|png|...>`, optionally with a caption sidecar
`<same stem>.txt` (one caption a line). The file's mtime is its timestamp. After ingest a
file moves to `<drop>/.processed/<camera_id>/`, or to `<drop>/.rejected/<camera_id>/` with a
`<name>.reason.txt` next to it.

Why the settle time: a detector writing straight into the folder (not via tmp + rename)
leaves half-written files for a moment; a file is read only once it has not changed for
`drop-settle-s`. Names starting with "." and ending in .tmp/.part are never read. A crash
between ingest and the move re-ingests the file on the next scan, which the gallery answers
with the existing id (content hash), so nothing is counted twice.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .gallery import Gallery, IngestItem

log = logging.getLogger(__name__)

SKIP_SUFFIXES = {".tmp", ".part", ".txt", ".partial", ".crdownload"}


class DropFolder:
    def __init__(self, root: Path, gallery: Gallery, settle_s: float = 1.0) -> None:
        self.root = Path(root)
        self.gallery = gallery
        self.settle_s = settle_s
        self.processed = self.root / ".processed"
        self.rejected = self.root / ".rejected"
        self.root.mkdir(parents=True, exist_ok=True)

    def scan_once(self) -> tuple[int, int]:
        """Ingest every settled file once; return (accepted, rejected)."""
        accepted = rejected = 0
        now = time.time()
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                if (
                    entry.suffix.lower() in SKIP_SUFFIXES
                    or now - entry.stat().st_mtime < self.settle_s
                ):
                    continue
                self._reject(entry, "", "not inside a camera folder (<drop>/<camera_id>/<file>)")
                rejected += 1
                continue
            for path in sorted(entry.iterdir()):
                if path.name.startswith(".") or not path.is_file():
                    continue
                if path.suffix.lower() in SKIP_SUFFIXES:
                    continue
                stat = path.stat()
                if now - stat.st_mtime < self.settle_s:
                    continue
                ok = self._ingest_file(path, entry.name, stat)
                accepted += ok
                rejected += not ok
        return accepted, rejected

    def _ingest_file(self, path: Path, camera_id: str, stat: os.stat_result) -> bool:
        limit = self.gallery.limits.max_image_bytes
        if stat.st_size > limit:  # do not even read it
            self._reject(path, camera_id, f"{stat.st_size} bytes exceeds max-image-bytes {limit}")
            return False
        sidecar = path.with_suffix(".txt")
        captions: tuple[str, ...] = ()
        if sidecar.is_file():
            lines = sidecar.read_text(encoding="utf-8", errors="replace").splitlines()
            captions = tuple(line.strip() for line in lines if line.strip())
        item = IngestItem(
            path.read_bytes(), camera_id, int(stat.st_mtime * 1000), captions, path.name
        )
        outcome = self.gallery.ingest([item])[0]
        if outcome.accepted:
            self._move(path, self.processed / camera_id)
            if sidecar.is_file():
                self._move(sidecar, self.processed / camera_id)
            log.debug("drop %s -> image %d", path, outcome.image_id)
            return True
        self._reject(path, camera_id, outcome.reason, counted=True)
        if sidecar.is_file():
            self._move(sidecar, self.rejected / camera_id)
        return False

    def _reject(self, path: Path, camera_id: str, reason: str, counted: bool = False) -> None:
        if not counted:  # the gallery counts what it rejects itself
            self.gallery.record_rejection(path.name, camera_id, reason)
        target = self.rejected / (camera_id or "_no_camera")
        self._move(path, target)
        (target / f"{path.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
        log.warning("drop file %s rejected: %s", path, reason)

    @staticmethod
    def _move(path: Path, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(path, folder / path.name)
