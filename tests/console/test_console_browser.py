"""The console page in a real headless Chromium against real node daemons and a real broker.

Every test signs in through the page, uses it as an operator would (clicks, typing, the
keyboard alone in one test) and checks what the page shows against what the broker says
for the same question. Screenshots for docs/console.md are taken along the way.
"""

from __future__ import annotations

import csv
import io
import re
import time

import grpc
import pytest
from console_fixtures import (
    TOKENS,
    WALKER_CAMERAS,
    WALKER_T0,
    closed_port_address,
    free_port,
    shot,
    sign_in,
    start_broker,
    start_console,
    write_console_config,
)

from protos import broker_pb2, broker_pb2_grpc
from server.operator.output import CSV_COLUMNS, format_time

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TEXT = "a person in a red top and black trousers"
CONTROL_ROLES = ("textbox", "searchbox", "spinbutton", "checkbox", "combobox", "button", "radio",
                 "link", "listbox", "slider", "switch")  # fmt: skip
WAIT_MS = 15_000


@pytest.fixture
def page(browser, console):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    yield pg
    context.close()


def broker_search(broker, **fields) -> broker_pb2.BrokerSearchResponse:
    """The same question asked of the broker directly (what the page must show)."""
    with grpc.insecure_channel(broker.address) as channel:
        return broker_pb2_grpc.BrokerServiceStub(channel).Search(
            broker_pb2.BrokerSearchRequest(**fields),
            metadata=[("authorization", f"Bearer {TOKENS['alice']}")],
            timeout=30,
        )


def search(page, text: str = TEXT, k: int | str = 8) -> None:
    page.get_by_label("Describe the person").fill(text)
    page.get_by_label("Hits (k)").fill(str(k))
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_load_state()


def tiles(page) -> list[dict]:
    """What each tile shows, read from the page: rank, score, camera, node, time, image."""
    return page.eval_on_selector_all(
        "ol.grid > li.tile",
        """els => els.map(li => {
            const dd = [...li.querySelectorAll('dd')].map(d => d.textContent.trim());
            const src = new URL(li.querySelector('img').src);
            return {rank: +dd[0], score: dd[1], camera: dd[2], node: dd[3], time: dd[4],
                    src_node: src.searchParams.get('node'), image: +src.searchParams.get('image')};
        })""",
    )


def wait_images_loaded(page, selector: str) -> list[int]:
    """naturalWidth of every image matched, once each finished loading (0: it failed).
    Lazy images load when near the viewport, so each is scrolled to, as a reader would."""
    for image in page.locator(selector).all():
        image.scroll_into_view_if_needed()
    page.wait_for_function(
        f"[...document.querySelectorAll({selector!r})].every(i => i.complete)", timeout=WAIT_MS
    )
    return page.eval_on_selector_all(selector, "els => els.map(i => i.naturalWidth)")


def error_text(page) -> str:
    return page.locator("[role=alert].error").inner_text()


# ---------------------------------------------------------------- sign-in


def test_wrong_token_is_refused_and_the_right_one_signs_in(page, console):
    page.goto(f"{console.url}/search")
    page.wait_for_url(re.compile(r"/login\?next="))  # nothing without signing in
    page.get_by_label("Operator token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    assert "not an operator's token" in error_text(page)
    assert "/login" in page.url
    assert not [c for c in page.context.cookies() if c["name"] == "fr_session"]
    shot(page, "sign-in-refused")
    page.get_by_label("Operator token").fill(TOKENS["bob"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{console.url}/search")  # back where it was going
    assert "Signed in as bob" in page.locator("header").inner_text()
    cookie = next(c for c in page.context.cookies() if c["name"] == "fr_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKENS["bob"] not in cookie["value"]


# ---------------------------------------------------------------- search


def test_search_shows_the_brokers_hits_as_tiles_with_coverage(page, console, broker):
    sign_in(page, console.url)
    search(page, TEXT, 8)
    expected = broker_search(broker, text=TEXT, k=8)
    shown = tiles(page)
    assert [(t["node"], t["image"]) for t in shown] == [
        (h.node_id, h.image_id) for h in expected.hits
    ]
    for i, (tile, hit) in enumerate(zip(shown, expected.hits, strict=True), 1):
        assert tile["rank"] == i and tile["score"] == f"{hit.score:.4f}"
        assert tile["camera"] == hit.camera_id and tile["src_node"] == hit.node_id
        assert tile["time"] == format_time(hit.timestamp_ms)
    widths = wait_images_loaded(page, "ol.grid img")
    assert len(widths) == 8 and all(w > 0 for w in widths), widths  # via GetThumbnail
    banner = page.locator("#coverage").inner_text()
    assert "Full coverage" in banner and "100% of the gallery" in banner
    assert "2 of 2 nodes answered" in banner
    assert "Merge mode: by score" in page.locator("#merge-mode").inner_text()
    shot(page, "search")


def test_camera_picker_and_last_two_hours_filter_the_hits(page, console):
    sign_in(page, console.url)
    page.get_by_label("north-cam0").check()
    page.get_by_label("Time range").select_option("2h")
    search(page, TEXT, 20)
    shown = tiles(page)
    assert shown and {t["camera"] for t in shown} == {"north-cam0"}
    # north-cam0 holds 1 walker crop + 3 others, one of them three hours old
    assert len(shown) == 3
    assert (
        "Not asked (holds none of the cameras chosen): south"
        in page.locator("#coverage").inner_text()
    )
    assert page.get_by_label("north-cam0").is_checked()  # the form keeps what was asked


def test_bad_input_shows_the_brokers_message_never_a_traceback(page, console):
    sign_in(page, console.url)
    search(page, "   ", 5)
    assert "`text` is empty" in error_text(page)
    shot(page, "bad-input")
    for k in (0, 1000):
        search(page, TEXT, k)
        assert "`k` must be between 1 and 100" in error_text(page), k
    page.get_by_label("Time range").select_option("custom")
    page.get_by_label("From").fill("2024-05-02T10:00")
    page.get_by_label("To").fill("2024-05-01T10:00")
    search(page, TEXT, 5)
    assert re.search(r"time range: since \(\d+\) is after until \(\d+\)", error_text(page))
    page.get_by_label("Time range").select_option("any")
    page.get_by_label("From").fill("")
    page.get_by_label("To").fill("")
    page.evaluate(
        """() => { const i = document.createElement('input'); i.type = 'hidden';
                   i.name = 'camera'; i.value = 'nowhere-cam';
                   document.getElementById('search-form').appendChild(i); }"""
    )
    search(page, TEXT, 5)
    assert "nowhere-cam" in error_text(page)
    content = page.content()
    assert "Traceback" not in content and 'File "' not in content


# ---------------------------------------------------------------- one hit, similar, sightings


def open_walker(page, console) -> None:
    """Search everything, then open the walker's first sighting (north-cam0)."""
    sign_in(page, console.url)
    search(page, TEXT, 16)
    when = format_time(WALKER_T0)
    page.get_by_role(
        "link", name=re.compile(f"camera north-cam0 on north, {re.escape(when)}")
    ).click()
    page.wait_for_url(re.compile(r"/hit/\d+$"))


def test_detail_view_shows_the_crop_and_all_metadata(page, console):
    open_walker(page, console)
    meta = page.locator("dl.meta").inner_text()
    fields = ["Score", "Camera", "north-cam0", "Node", "north", "Image id", "Model version"]
    for field in [*fields, "walker-north-cam0.png", "query id"]:
        assert field in meta, field
    assert wait_images_loaded(page, "img.large")[0] >= 48  # the node's full-size thumbnail
    shot(page, "detail")


def test_find_similar_then_sightings_follow_the_walker_across_cameras(page, console, fleet):
    open_walker(page, console)
    page.get_by_label("Hits (k)").fill("4")
    page.get_by_role("button", name="Find similar to this person").click()
    page.wait_for_url(re.compile(r"/results/[^/]+$"))
    assert {(t["node"], t["image"]) for t in tiles(page)} == fleet.walker_ids()
    assert "similar to north/" in page.locator("#results-heading").inner_text()
    page.get_by_role("link", name="Sightings timeline").click()
    page.wait_for_url(re.compile(r"/sightings$"))
    lanes = page.locator(".lane-name").all_inner_texts()
    assert [lane.split()[0] for lane in lanes] == [cam for _, cam in WALKER_CAMERAS]  # by time
    rows = page.locator("table.sightings tbody tr").all_inner_texts()
    assert [r.split("\t")[1] for r in rows] == [cam for _, cam in WALKER_CAMERAS]
    marks = page.eval_on_selector_all("li.mark", "els => els.map(e => e.className)")
    assert marks == ["mark pos-0", "mark pos-33", "mark pos-67", "mark pos-100"]
    assert all(w > 0 for w in wait_images_loaded(page, "li.mark img"))
    shot(page, "sightings")
    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    rows = list(csv.reader(io.StringIO(download.value.path().read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 5
    assert {(r[5], int(r[8])) for r in rows[1:]} == fleet.walker_ids()


def test_export_csv_is_the_query_commands_file(page, console):
    sign_in(page, console.url)
    search(page, TEXT, 6)
    shown = tiles(page)
    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    assert download.value.suggested_filename.endswith(".csv")
    rows = list(csv.reader(io.StringIO(download.value.path().read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r[5], int(r[8])) for r in rows[1:]] == [(t["node"], t["image"]) for t in shown]
    assert {r[1] for r in rows[1:]} == {TEXT} and [r[2] for r in rows[1:]] == list("123456")
    assert {r[9] for r in rows[1:]} == {"score"}
    with page.expect_download() as download:
        page.get_by_role("button", name="Export JSON").click()
    assert '"coverage"' in download.value.path().read_text()


# ---------------------------------------------------------------- degraded fleet, broker down


def test_a_failed_node_is_named_in_the_banner(page, fleet, tiny_model, tmp_path):
    nodes = dict(fleet.nodes, west=closed_port_address())
    degraded = start_broker(nodes, tiny_model)
    running = start_console(write_console_config(tmp_path, degraded.address))
    try:
        sign_in(page, running.url)
        search(page, TEXT, 5)
        banner = page.locator("#coverage")
        assert banner.get_attribute("role") == "alert"
        text = banner.inner_text()
        assert "Partial results" in text and "2 of 3 nodes answered" in text
        assert re.search(r"west failed \(UNAVAILABLE", text), text
        assert "gallery size of west is not known" in text
        assert len(tiles(page)) == 5  # the nodes that answered still did
        shot(page, "failed-node")
    finally:
        running.stop()
        degraded.stop()


def test_the_console_keeps_working_when_the_broker_restarts(page, fleet, tiny_model, tmp_path):
    port = free_port()
    first = start_broker(fleet.nodes, tiny_model, port)
    running = start_console(write_console_config(tmp_path, first.address))
    second = None
    try:
        sign_in(page, running.url)
        search(page, TEXT, 3)
        assert len(tiles(page)) == 3
        first.stop()
        search(page, TEXT, 3)
        assert "broker" in error_text(page) and "127.0.0.1:" in error_text(page)
        page.goto(f"{running.url}/search")
        assert page.locator("#broker-banner").is_visible()
        assert "not reachable" in page.locator("#broker-banner").inner_text()
        shot(page, "broker-down")
        second = start_broker(fleet.nodes, tiny_model, port)
        deadline = time.monotonic() + 20
        while True:  # the first page after the restart may still meet the old channel
            search(page, TEXT, 3)
            if page.locator("ol.grid").count() or time.monotonic() > deadline:
                break
        assert len(tiles(page)) == 3
        page.goto(f"{running.url}/search")
        assert not page.locator("#broker-banner").is_visible()
    finally:
        running.stop()
        if second is not None:
            second.stop()


# ---------------------------------------------------------------- fleet, audit


def test_fleet_page_lists_every_node(page, console, tiny_model):
    sign_in(page, console.url)
    page.get_by_role("link", name="Fleet").click()
    rows = {r.split("\t")[0]: r for r in page.locator("table.fleet tbody tr").all_inner_texts()}
    assert set(rows) == {"north", "south"}
    for node_id, row in rows.items():
        assert "healthy" in row and f"{node_id}-cam0, {node_id}-cam1" in row
        assert "\t8\t8\t" in row and tiny_model.version in row  # gallery, indexed
        assert "base model" in row  # no adapter yet
    assert page.locator("#broker-version").inner_text() == tiny_model.version
    shot(page, "fleet")


def test_audit_log_page_is_for_admins_and_lists_the_searches(page, console):
    sign_in(page, console.url, "bob")
    search(page, "bob looks for a green coat", 3)
    assert len(wait_images_loaded(page, "ol.grid img")) == 3  # three thumbnail views
    page.goto(f"{console.url}/audit")
    assert "admin operators only" in error_text(page)
    assert not page.get_by_role("link", name="Audit log").count()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile("/login"))
    sign_in(page, console.url, "alice")
    page.get_by_role("link", name="Audit log").click()
    page.get_by_label("Operator").select_option("bob")
    page.get_by_role("button", name="Show").click()
    rows = page.locator("table.audit tbody tr").all_inner_texts()
    search_row = next(r for r in rows if "bob looks for a green coat" in r)
    cells = search_row.split("\t")
    assert cells[1] == "bob" and cells[2] == "search" and cells[4] == "3" and cells[5] == "ok"
    assert any("\tthumbnail\t" in r for r in rows) and any("\tsign_in\t" in r for r in rows)
    shot(page, "audit")


# ---------------------------------------------------------------- keyboard and screen readers


def press_tab_until(page, predicate: str, most: int = 80) -> None:
    for _ in range(most):
        page.keyboard.press("Tab")
        if page.evaluate(f"() => {{ const el = document.activeElement; return {predicate}; }}"):
            return
    raise AssertionError(f"Tab never reached an element where {predicate}")


def test_keyboard_alone_signs_in_searches_opens_a_hit_and_finds_similar(page, console):
    page.goto(f"{console.url}/login")
    # the token field takes the focus itself (autofocus); wait for it, or keys are lost
    page.wait_for_function("document.activeElement && document.activeElement.id === 'token'")
    page.keyboard.type(TOKENS["alice"])
    page.keyboard.press("Enter")
    page.wait_for_url(f"{console.url}/search")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    press_tab_until(page, "el.id === 'text'")
    page.keyboard.type(TEXT)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/results/[^/]+$"))
    press_tab_until(page, "el.classList.contains('tile-link')")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/hit/1$"))
    press_tab_until(page, "el.getAttribute('aria-label') === 'Find similar to this person'")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/results/[^/]+$"))
    assert "similar to" in page.locator("#results-heading").inner_text()
    outline = page.evaluate(
        "() => { document.querySelector('a.tile-link').focus();"
        " return getComputedStyle(document.activeElement).outlineStyle; }"
    )
    assert outline != "none"  # focus is visible


def unnamed_controls(page) -> tuple[list[str], int, int]:
    """Controls in the accessibility tree without a name, how many controls it lists, and
    how many visible controls the DOM has (so none is missing from the tree)."""
    snapshot = page.locator("body").aria_snapshot()
    lines = [ln.strip() for ln in snapshot.splitlines()]
    pattern = re.compile(rf"^- ({'|'.join(CONTROL_ROLES)})\b(.*)$")
    controls = [m for m in map(pattern.match, lines) if m]
    unnamed = [m.group(0) for m in controls if not m.group(2).lstrip().startswith('"')]
    visible = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button, textarea')]
                 .filter(e => e.type !== 'hidden' && e.checkVisibility()).length"""
    )
    form_controls = [m for m in controls if m.group(1) != "link"]
    return unnamed, len(form_controls), visible


def test_every_control_has_a_label_for_screen_readers(page, console):
    pages = {}
    page.goto(f"{console.url}/login")
    pages["login"] = unnamed_controls(page)
    sign_in(page, console.url)
    page.locator("details.more summary").click()  # the folded options count too
    pages["search form"] = unnamed_controls(page)
    search(page, TEXT, 6)
    pages["results"] = unnamed_controls(page)
    page.locator("a.tile-link").first.click()
    pages["detail"] = unnamed_controls(page)
    page.get_by_role("button", name="Sightings of this person across cameras").click()
    page.wait_for_url(re.compile(r"/sightings$"))
    pages["sightings"] = unnamed_controls(page)
    for path in ("fleet", "audit"):
        page.goto(f"{console.url}/{path}")
        pages[path] = unnamed_controls(page)
    for name, (unnamed, listed, visible) in pages.items():
        assert not unnamed, (name, unnamed)
        assert listed >= visible > 0, (name, listed, visible)
    assert pages["search form"][2] > pages["login"][2]  # the pickers were counted


def test_thumbnails_need_a_session(page, console, fleet):
    node_id, ids = next(iter(fleet.image_ids.items()))
    response = page.request.get(f"{console.url}/thumb?node={node_id}&image={ids[0]}&side=64")
    assert response.status == 401
