"""The console's audit log: one JSON line per search, find-similar, thumbnail view, export
and sign-in, appended and fsynced before the operator sees the result.

Append-only: the file is opened with O_APPEND (every write lands at the end, whatever else
writes to it), never truncated or rewritten by the console, created 0600. A write that
fails refuses the action it records (`AuditUnavailable`): a search that cannot be accounted
for is not run. Rotating the file is the operator's business (move it away; the console
reopens by path on the next write when the old one was moved).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.errors import FedRetrieveError

TAIL_BYTES = 4 << 20  # how far back the admin page reads


class AuditUnavailable(FedRetrieveError):
    """The audit log cannot be written: the action is refused."""


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as err:
            raise AuditUnavailable(
                f"the audit log {self.path} cannot be opened ({err.strerror}): searches are "
                "refused until it can"
            ) from err
        st = os.fstat(fd)
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)

    def _reopen_if_moved(self) -> None:
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._ino
        except FileNotFoundError:
            moved = True
        if moved:
            self.close()
            self._open()

    def record(self, operator: str, action: str, **fields: Any) -> dict[str, Any]:
        """Append one entry and fsync it; returns the entry. Raises AuditUnavailable."""
        now = time.time()
        entry = {
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
            "operator": operator,
            "action": action,
            **fields,
        }
        line = (json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                self._reopen_if_moved()
                assert self._fd is not None
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(0, f"short write ({written} of {len(line)} bytes)")
                os.fsync(self._fd)
            except OSError as err:
                raise AuditUnavailable(
                    f"the audit log {self.path} cannot be written ({err.strerror or err}): "
                    f"the {action} was refused"
                ) from err
        return entry

    def tail(self, limit: int = 200, operator: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` entries (of `operator` only, if given), newest first."""
        out = []
        for entry in self._read_backwards():
            if operator and entry.get("operator") != operator:
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out

    def _read_backwards(self) -> Iterator[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                start = max(0, size - TAIL_BYTES)
                fh.seek(start)
                data = fh.read()
        except FileNotFoundError:
            return
        lines = data.split(b"\n")
        if start:
            lines = lines[1:]  # the first one is cut
        for raw in reversed(lines):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except ValueError:
                yield {"action": "unreadable line", "raw": raw[:200].decode(errors="replace")}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
