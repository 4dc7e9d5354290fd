"""One reader per annotation format, all yielding `Record`s.

A bad entry (missing image, malformed row) raises DatasetError naming the file and the
line or entry; with `skip_bad=True` it is skipped and counted instead, so one broken row in
a 150k-caption file does not cost an evening.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    image_path: Path
    captions: tuple[str, ...]
    person_id: int
    camera_id: str = ""
    split: str = "train"
    node: str | None = None
    timestamp_ms: int = 0


@dataclass
class DatasetLoad:
    records: list[Record]
    fmt: str
    skipped: list[str] = field(default_factory=list)  # one reason per skipped entry


class _Collector:
    """Raises on the first bad entry, or counts it when the user asked to skip."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def bad(self, where: str, reason: str) -> None:
        if not self.skip_bad:
            raise DatasetError(
                f"{where}: {reason} (pass skip_bad / --skip-bad to skip such "
                "entries and count them)"
            )
        self.skipped.append(f"{where}: {reason}")


def _image(root: Path, rel: str, where: str, bad: _Collector, check: bool) -> Path | None:
    if not isinstance(rel, str) or not rel:
        bad.bad(where, "no image path")
        return None
    path = root / rel
    if check and not path.is_file():
        bad.bad(where, f"image not found: {path}")
        return None
    return path


def _captions(value, where: str, bad: _Collector) -> tuple[str, ...] | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        bad.bad(where, f"captions must be a list of strings, got {type(value).__name__}")
        return None
    caps = tuple(c.strip() for c in value if c.strip())
    if not caps:
        bad.bad(where, "no caption")
        return None
    return caps


def _image_root(json_path: Path, first_rel: str | None) -> Path:
    """PEDES datasets keep images under `imgs/` next to the annotation file."""
    base = json_path.parent
    if first_rel and not (base / first_rel).exists() and (base / "imgs" / first_rel).exists():
        return base / "imgs"
    return base


def _load_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DatasetError(f"annotation file not found: {path}") from err
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def read_pedes(path: Path, bad: _Collector, check: bool) -> Iterator[Record]:
    """CUHK-PEDES reid_raw.json / ICFG-PEDES.json / our annotations.json."""
    data = _load_json_list(path)
    first = next((e.get("file_path") for e in data if isinstance(e, dict)), None)
    root = _image_root(path, first)
    for i, entry in enumerate(data):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict) or "id" not in entry:
            bad.bad(where, "not an object with `id`, `file_path`, `captions`")
            continue
        img = _image(root, entry.get("file_path"), where, bad, check)
        caps = _captions(entry.get("captions"), where, bad)
        if img is None or caps is None:
            continue
        try:
            pid = int(entry["id"])
        except (TypeError, ValueError):
            bad.bad(where, f"person id {entry['id']!r} is not an integer")
            continue
        yield Record(
            img,
            caps,
            pid,
            str(entry.get("camera", "")),
            str(entry.get("split", "train")),
            entry.get("node"),
            int(entry.get("timestamp_ms", 0)),
        )


_CAMERA = re.compile(r"(?:^|_)c(\d+)(?:_|\.|$)")


def read_rstp(path: Path, bad: _Collector, check: bool) -> Iterator[Record]:
    """RSTPReid data_captions.json: {id, img_path, captions, split}; camera cNN in the name."""
    data = _load_json_list(path)
    first = next((e.get("img_path") for e in data if isinstance(e, dict)), None)
    root = _image_root(path, first)
    for i, entry in enumerate(data):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict) or "id" not in entry:
            bad.bad(where, "not an object with `id`, `img_path`, `captions`")
            continue
        img = _image(root, entry.get("img_path"), where, bad, check)
        caps = _captions(entry.get("captions"), where, bad)
        if img is None or caps is None:
            continue
        match = _CAMERA.search(Path(entry["img_path"]).stem)
        camera = f"c{int(match.group(1)):02d}" if match else ""
        yield Record(img, caps, int(entry["id"]), camera, str(entry.get("split", "train")))


_FLICKR_ROW = re.compile(r"^\s*([^|\s]+\.jpe?g)\s*\|\s*(\d+)\s*\|?\s*(.*)$", re.IGNORECASE)


def read_flickr30k(path: Path, bad: _Collector, check: bool) -> Iterator[Record]:
    """Flickr30k results.csv (`image_name| comment_number| comment`), tolerating the known
    row where the second `|` is missing. Each image is its own identity; split: 1 image in
    30 (by name hash) is test, the rest train (results.csv carries no split)."""
    root = path.parent / "flickr30k_images"
    root = root if root.is_dir() else path.parent
    captions: dict[str, list[str]] = {}
    order: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if lineno == 1 and line.lower().startswith("image_name"):
                continue
            if not line.strip():
                continue
            m = _FLICKR_ROW.match(line.rstrip("\n"))
            if not m or not m.group(3).strip():
                bad.bad(f"{path}:{lineno}", f"malformed row {line.strip()[:60]!r}")
                continue
            name = m.group(1)
            if name not in captions:
                captions[name] = []
                order.append(name)
            captions[name].append(m.group(3).strip())
    for idx, name in enumerate(order):
        img = _image(root, name, f"{path} image {name}", bad, check)
        if img is None:
            continue
        split = "test" if zlib.crc32(name.encode()) % 30 == 0 else "train"
        yield Record(img, tuple(captions[name]), idx, "", split)


def read_csv(path: Path, bad: _Collector, check: bool) -> Iterator[Record]:
    """image,caption,person_id,camera_id[,split][,timestamp_ms]; rows of one image merge."""
    grouped: dict[str, dict] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"image", "caption", "person_id", "camera_id"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise DatasetError(
                f"{path}:1: header must contain {sorted(need)}, got {reader.fieldnames}"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or any(row.get(k) in (None, "") for k in ("image", "person_id")):
                bad.bad(where, "malformed row (missing image or person_id, or extra columns)")
                continue
            pid_text = row["person_id"].strip()
            pid = int(pid_text) if pid_text.isdigit() else zlib.crc32(pid_text.encode())
            entry = grouped.setdefault(
                row["image"],
                {
                    "captions": [],
                    "pid": pid,
                    "where": where,
                    "camera": row["camera_id"],
                    "row": row,
                },
            )
            if row.get("caption", "").strip():
                entry["captions"].append(row["caption"].strip())
    for rel, entry in grouped.items():
        img = _image(path.parent, rel, entry["where"], bad, check)
        caps = _captions(entry["captions"], entry["where"], bad)
        if img is None or caps is None:
            continue
        row = entry["row"]
        split = row.get("split") or (
            "test" if zlib.crc32(str(entry["pid"]).encode()) % 5 == 0 else "train"
        )
        ts = row.get("timestamp_ms") or "0"
        yield Record(
            img,
            caps,
            entry["pid"],
            entry["camera"],
            split,
            timestamp_ms=int(ts) if ts.isdigit() else 0,
        )


FORMATS: dict[str, Callable] = {
    "pedes": read_pedes,
    "cuhk": read_pedes,
    "icfg": read_pedes,
    "synth": read_pedes,
    "rstp": read_rstp,
    "flickr30k": read_flickr30k,
    "csv": read_csv,
}
_KNOWN_FILES = {
    "annotations.json": "synth",
    "ICFG-PEDES.json": "icfg",
    "reid_raw.json": "cuhk",
    "data_captions.json": "rstp",
    "results.csv": "flickr30k",
}


def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format, annotation file) for a dataset directory or annotation file."""
    path = Path(path)
    if path.is_dir():
        for name, fmt in _KNOWN_FILES.items():
            if (path / name).is_file():
                return fmt, path / name
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) == 1:
            return "csv", csvs[0]
        raise DatasetError(
            f"{path}: no known annotation file ({', '.join(_KNOWN_FILES)} or one .csv)"
        )
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    if path.name in _KNOWN_FILES:
        return _KNOWN_FILES[path.name], path
    if path.suffix == ".csv":
        return "csv", path
    if path.suffix == ".json":
        return "pedes", path
    raise DatasetError(f"{path}: cannot tell the annotation format; pass fmt=")


def read_dataset(
    path: str | Path, *, fmt: str = "auto", skip_bad: bool = False, check_images: bool = True
) -> DatasetLoad:
    detected, file = detect_format(path)
    fmt = detected if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; one of {sorted(FORMATS)}")
    bad = _Collector(skip_bad)
    records = list(FORMATS[fmt](file, bad, check_images))
    if bad.skipped:
        log.warning(
            "%s: skipped %d bad entries (first: %s)", file, len(bad.skipped), bad.skipped[0]
        )
    return DatasetLoad(records, fmt, bad.skipped)


def load_records(
    path: str | Path, *, fmt: str = "auto", skip_bad: bool = False, split: str | None = None
) -> list[Record]:
    records = read_dataset(path, fmt=fmt, skip_bad=skip_bad).records
    return [r for r in records if split is None or r.split == split]
