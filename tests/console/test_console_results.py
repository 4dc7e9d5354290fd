"""The console's pure parts: the form read into a request, coverage, sightings, min score."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from common.errors import InvalidQuery
from protos import broker_pb2
from server.console.app import HERE
from server.console.results import (
    SearchForm,
    apply_min_score,
    coverage_view,
    sightings,
)


def response(hits, merge="score", nodes=()) -> broker_pb2.BrokerSearchResponse:
    out = broker_pb2.BrokerSearchResponse(merge=merge, query_id="q1")
    for node_id, image_id, camera, t, score in hits:
        out.hits.add(
            node_id=node_id, image_id=image_id, camera_id=camera, timestamp_ms=t, score=score
        )
    for node_id, state, size, version in nodes:
        out.coverage.nodes.add(
            node_id=node_id, state=state, gallery_size=size, model_version=version
        )
    return out


def test_the_form_becomes_the_request_as_typed():
    form = SearchForm.from_fields(
        {"text": ["  red coat "], "k": ["7"], "node": ["a", ""], "camera": ["c1", "c2"],
         "range": ["custom"], "since": ["2024-05-01T08:30"], "until": [""], "tz": ["-120"],
         "full": ["1"], "deadline_ms": ["900"]}
    )  # fmt: skip
    request = form.request()
    assert request.text == "  red coat " and request.k == 7  # the broker strips and judges
    assert list(request.node_ids) == ["a"] and list(request.filters.camera_ids) == ["c1", "c2"]
    # 08:30 in a browser at UTC+2 (getTimezoneOffset -120) is 06:30 UTC
    expected = datetime(2024, 5, 1, 6, 30, tzinfo=timezone.utc).timestamp() * 1000
    assert request.filters.time_range.since_ms == expected
    assert request.filters.time_range.until_ms == 0
    assert request.require_full_coverage and request.deadline_ms == 900


def test_last_two_hours_and_what_only_the_console_can_refuse():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    since, until = SearchForm(range="2h").time_range(now)
    assert since == datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc).timestamp() * 1000
    assert until == 0
    assert SearchForm(k="0").request().k == 0  # out of range: the broker says so
    with pytest.raises(InvalidQuery, match="not a whole number"):
        SearchForm(k="ten").request()
    with pytest.raises(InvalidQuery, match="far out of range"):
        SearchForm(k="99999999999").request()
    with pytest.raises(InvalidQuery, match="is not a time"):
        SearchForm(range="custom", since="yesterday").request()
    with pytest.raises(InvalidQuery, match="not a number"):
        SearchForm(min_score="high").min_score_value()


def test_min_score_hides_hits_and_counts_them():
    full = response([("a", 1, "c", 1, 0.9), ("a", 2, "c", 2, 0.5), ("b", 3, "d", 3, 0.1)])
    kept, hidden = apply_min_score(full, 0.5)
    assert [h.image_id for h in kept.hits] == [1, 2] and hidden == 1
    assert len(full.hits) == 3 and kept.query_id == "q1"  # the broker's answer is untouched
    assert apply_min_score(full, None) == (full, 0)


def test_coverage_names_missing_nodes_and_rank_fusion():
    answer = response(
        [],
        merge="rrf",
        nodes=[("a", "ok", 10, "v1"), ("b", "ok", 5, "v2"), ("c", "timed_out", 7, ""),
               ("d", "failed", 0, ""), ("e", "skipped", 3, "v1")],
    )  # fmt: skip
    answer.coverage.vectors_searched, answer.coverage.vectors_total = 15, 25
    view = coverage_view(answer)
    assert view.share == "60%" and view.rrf and view.versions == ["v1", "v2"]
    assert [p[:2] for p in view.problems] == [("c", "timed_out"), ("d", "failed")]
    assert view.unknown == ["d"] and view.skipped == ["e"]
    from jinja2 import Environment, FileSystemLoader

    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True)
    html = env.get_template("_coverage.html").render(coverage=view, coverage_text="")
    assert "Merge mode: rank fusion" in html and "v1, v2" in html
    assert "<strong>c</strong> timed out" in html and "<strong>d</strong> failed" in html


def test_sightings_one_lane_per_camera_on_one_time_axis():
    answer = response(
        [("a", 1, "cam1", 1000, 0.9), ("b", 2, "cam2", 3000, 0.8), ("a", 3, "cam1", 5000, 0.7),
         ("a", 4, "cam0", 0, 0.6)],  # no time: not on the timeline
    )  # fmt: skip
    lanes, start, end, table = sightings(answer)
    assert [(lane.camera, [s.pos for s in lane.sightings]) for lane in lanes] == [
        ("cam1", [0, 100]),
        ("cam2", [50]),
    ]
    assert [s.rank for s in table] == [1, 2, 3] and start != end
    assert sightings(response([])) == ([], "-", "-", [])
