"""What the pages show: the search form read into a broker request, the results kept for
the session that asked (grid, detail, sightings, export), the coverage banner and the
per-camera timeline of a find-similar.

Validation here is only what the broker cannot see (a number that is not a number, a time
that is not a time); everything else (empty text, k out of range, inverted times, unknown
cameras) is sent as typed so the operator reads the broker's own reason.
"""

from __future__ import annotations

import io
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from common.errors import InvalidQuery
from protos import broker_pb2, retrieval_pb2
from server.operator.output import format_time, print_json, write_results_csv

INT32_MAX = 2**31 - 1
RANGES = {  # the "time range" picker: label, seconds back from now
    "any": ("Any time", 0),
    "15m": ("Last 15 minutes", 15 * 60),
    "1h": ("Last hour", 3600),
    "2h": ("Last 2 hours", 2 * 3600),
    "24h": ("Last 24 hours", 24 * 3600),
    "7d": ("Last 7 days", 7 * 86400),
    "custom": ("Between the times below", 0),
}


@dataclass
class SearchForm:
    """The search form as typed (kept to refill the form after an error or on results)."""

    text: str = ""
    k: str = "20"
    nodes: list[str] = field(default_factory=list)
    cameras: list[str] = field(default_factory=list)
    range: str = "any"
    since: str = ""
    until: str = ""
    tz: str = ""  # the browser's getTimezoneOffset(), minutes; "" = the console's zone
    min_score: str = ""
    deadline_ms: str = ""
    full: bool = False

    @classmethod
    def from_fields(cls, fields: dict[str, list[str]]) -> SearchForm:
        def one(name: str, default: str = "") -> str:
            values = fields.get(name)
            return values[-1] if values else default

        return cls(
            text=one("text"),
            k=one("k", "20").strip(),
            nodes=[v for v in fields.get("node", []) if v],
            cameras=[v for v in fields.get("camera", []) if v],
            range=one("range", "any"),
            since=one("since").strip(),
            until=one("until").strip(),
            tz=one("tz").strip(),
            min_score=one("min_score").strip(),
            deadline_ms=one("deadline_ms").strip(),
            full=one("full") == "1",
        )

    # ---------------------------------------------------------------- checks
    def k_value(self) -> int:
        return _int(self.k, "k (hits to return)")

    def min_score_value(self) -> float | None:
        if not self.min_score:
            return None
        try:
            return float(self.min_score)
        except ValueError as err:
            raise InvalidQuery(f"minimum score {self.min_score!r} is not a number") from err

    def deadline_value(self) -> int:
        return _int(self.deadline_ms, "deadline (ms)") if self.deadline_ms else 0

    def time_range(self, now: datetime | None = None) -> tuple[int, int]:
        if self.range not in RANGES:
            raise InvalidQuery(f"unknown time range {self.range!r}")
        now = now or datetime.now(timezone.utc)
        back = RANGES[self.range][1]
        if back:
            return int((now - timedelta(seconds=back)).timestamp() * 1000), 0
        if self.range == "custom" or self.since or self.until:
            return (
                _local_ms(self.since, "since", self.tz),
                _local_ms(self.until, "until", self.tz),
            )
        return 0, 0

    def filters(self) -> retrieval_pb2.Filters:
        since, until = self.time_range()
        return retrieval_pb2.Filters(
            camera_ids=self.cameras,
            time_range=retrieval_pb2.TimeRange(since_ms=since, until_ms=until),
        )

    def request(self) -> broker_pb2.BrokerSearchRequest:
        return broker_pb2.BrokerSearchRequest(
            text=self.text,
            k=self.k_value(),
            deadline_ms=self.deadline_value(),
            node_ids=self.nodes,
            filters=self.filters(),
            require_full_coverage=self.full,
        )

    def similar_request(self, node_id: str, image_id: int) -> broker_pb2.SearchSimilarRequest:
        return broker_pb2.SearchSimilarRequest(
            node_id=node_id,
            image_id=image_id,
            k=self.k_value(),
            deadline_ms=self.deadline_value(),
            node_ids=self.nodes,
            filters=self.filters(),
            require_full_coverage=self.full,
        )


def _int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise InvalidQuery(f"{what} {text!r} is not a whole number") from err
    if not -INT32_MAX <= value <= INT32_MAX:
        raise InvalidQuery(f"{what} {value} is far out of range")
    return value


def _local_ms(text: str, what: str, tz: str) -> int:
    """A `datetime-local` value (no zone: the browser's, from `tz`) in epoch ms; "" -> 0."""
    if not text:
        return 0
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise InvalidQuery(
            f"{what} {text!r} is not a time: use the date picker or 2024-05-01T08:30"
        ) from err
    if when.tzinfo is None:
        if tz.lstrip("-").isdigit() and abs(int(tz)) <= 16 * 60:
            when = when.replace(tzinfo=timezone(timedelta(minutes=-int(tz))))
        else:
            when = when.astimezone()
    return int(when.timestamp() * 1000)


# ---------------------------------------------------------------- results kept per session


@dataclass
class Result:
    rid: str
    operator: str
    kind: str  # "search" | "similar"
    title: str  # the text, or "similar to node/image"
    form: SearchForm
    response: broker_pb2.BrokerSearchResponse  # hits below the minimum score removed
    hidden: int  # hits under the minimum score
    source: tuple[str, int] | None = None  # find-similar: the image searched from
    created: float = field(default_factory=time.time)

    @property
    def query_for_csv(self) -> str:
        return self.form.text if self.kind == "search" else self.title


class ResultStore:
    """The newest results, each readable only by the operator who asked for it."""

    def __init__(self, capacity: int = 256, ttl_s: float = 3600.0) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, Result] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, **fields) -> Result:
        result = Result(rid=secrets.token_urlsafe(9), **fields)
        with self._lock:
            self._items[result.rid] = result
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return result

    def get(self, rid: str, operator: str) -> Result | None:
        with self._lock:
            result = self._items.get(rid)
            if result is None or result.operator != operator:
                return None
            if time.time() - result.created > self.ttl_s:
                del self._items[rid]
                return None
            return result


def apply_min_score(
    response: broker_pb2.BrokerSearchResponse, min_score: float | None
) -> tuple[broker_pb2.BrokerSearchResponse, int]:
    if min_score is None:
        return response, 0
    kept = broker_pb2.BrokerSearchResponse()
    kept.CopyFrom(response)
    del kept.hits[:]
    kept.hits.extend(h for h in response.hits if h.score >= min_score)
    return kept, len(response.hits) - len(kept.hits)


# ---------------------------------------------------------------- exports (the CLI's writers)


def export_csv(result: Result) -> bytes:
    """`fedretrieve query --csv`'s file, written by the same function."""
    with tempfile.TemporaryDirectory(prefix="fedretrieve-console-") as tmp:
        path = Path(tmp) / "results.csv"
        write_results_csv(result.response, result.query_for_csv, path)
        return path.read_bytes()


def export_json(result: Result) -> bytes:
    buf = io.StringIO()
    print_json(result.response, out=buf)
    return buf.getvalue().encode()


# ---------------------------------------------------------------- coverage banner


@dataclass(frozen=True)
class CoverageView:
    full: bool
    answered: int
    total: int
    share: str  # "87%" of the gallery searched
    searched: int
    vectors: int
    problems: list[tuple[str, str, str, str]]  # node, state, grpc status, message
    skipped: list[str]
    unknown: list[str]  # missing nodes whose gallery size is not known (not in `vectors`)
    rrf: bool
    versions: list[str]
    degraded: list[str]
    # nodes that answered with a distilled student: node, its version, teacher, verified, note
    students: list[tuple[str, str, str, bool, str]] = field(default_factory=list)

    @property
    def verified_students(self) -> list[str]:
        """Student nodes merged by score with the broker's version (calibration passed)."""
        return [node for node, _version, _teacher, verified, _note in self.students if verified]


def coverage_view(response: broker_pb2.BrokerSearchResponse) -> CoverageView:
    cov = response.coverage
    share = (
        f"{100.0 * cov.vectors_searched / cov.vectors_total:.0f}%" if cov.vectors_total else "0%"
    )
    problems = [
        (o.node_id, o.state, o.grpc_status, o.message)
        for o in cov.nodes
        if o.state not in ("ok", "skipped")
    ]
    versions = sorted({o.model_version for o in cov.nodes if o.state == "ok" and o.model_version})
    return CoverageView(
        full=cov.full,
        answered=cov.nodes_answered,
        total=cov.nodes_total,
        share=share,
        searched=cov.vectors_searched,
        vectors=cov.vectors_total,
        problems=problems,
        skipped=[o.node_id for o in cov.nodes if o.state == "skipped"],
        unknown=[
            o.node_id for o in cov.nodes if o.state not in ("ok", "skipped") and not o.gallery_size
        ],
        rrf=response.merge == "rrf",
        versions=versions,
        degraded=list(cov.degraded),
        students=[
            (
                o.node_id,
                o.model_version,
                o.student.teacher_version,
                o.student.verified,
                o.student.note,
            )
            for o in cov.nodes
            if o.HasField("student")
        ],
    )


# ---------------------------------------------------------------- sightings timeline


@dataclass(frozen=True)
class Sighting:
    rank: int
    hit: retrieval_pb2.Hit
    pos: int  # 0..100, where on the time axis
    when: str


@dataclass(frozen=True)
class Lane:
    camera: str
    node: str
    sightings: list[Sighting]


def sightings(response: broker_pb2.BrokerSearchResponse) -> tuple[list[Lane], str, str, list]:
    """One lane per camera, sightings placed on a shared time axis (0..100), lanes ordered by
    first sighting; also the axis ends and every sighting in time order (the table)."""
    timed = [(rank, h) for rank, h in enumerate(response.hits, 1) if h.timestamp_ms]
    if not timed:
        return [], "-", "-", []
    t0 = min(h.timestamp_ms for _, h in timed)
    t1 = max(h.timestamp_ms for _, h in timed)
    span = max(t1 - t0, 1)
    lanes: dict[tuple[str, str], list[Sighting]] = {}
    for rank, hit in timed:
        pos = round(100 * (hit.timestamp_ms - t0) / span) if t1 > t0 else 50
        lanes.setdefault((hit.camera_id or "-", hit.node_id), []).append(
            Sighting(rank, hit, pos, format_time(hit.timestamp_ms))
        )
    ordered = sorted(lanes.items(), key=lambda kv: min(s.hit.timestamp_ms for s in kv[1]))
    out = [
        Lane(cam, node, sorted(items, key=lambda s: s.hit.timestamp_ms))
        for (cam, node), items in ordered
    ]
    table = sorted((s for lane in out for s in lane.sightings), key=lambda s: s.hit.timestamp_ms)
    return out, format_time(t0), format_time(t1), table
