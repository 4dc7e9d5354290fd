"""The console's security and accounting over real HTTP (httpx against uvicorn on loopback),
in front of the real broker and nodes: sign-in, cookies, CSRF, privacy of results, the
audit log, exports equal to `fedretrieve query --csv`, the config checks and the command.
"""

from __future__ import annotations

import json
import os
import queue
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from console_fixtures import TOKENS, start_console, write_console_config

from common.errors import ConfigError
from protos import broker_pb2, broker_pb2_grpc
from server.console.config import console_config_from_dict, load_console_config, read_operators
from server.operator.output import write_results_csv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TEXT = "someone in a blue shirt"
ROOT = Path(__file__).resolve().parents[2]


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def signed_in(url: str, operator: str = "alice") -> httpx.Client:
    client = httpx.Client(base_url=url, follow_redirects=True, timeout=30)
    page = client.get("/login")
    reply = client.post("/login", data={"csrf": csrf_of(page.text), "token": TOKENS[operator]})
    assert reply.status_code == 200 and str(reply.url).endswith("/search"), reply.text
    return client


def audit_lines(console) -> list[dict]:
    return [json.loads(line) for line in (console.folder / "audit.jsonl").read_text().splitlines()]


def test_every_page_needs_a_session(console):
    with httpx.Client(base_url=console.url, timeout=30) as client:
        for path in ("/search", "/fleet", "/audit", "/results/abc"):
            reply = client.get(path)
            assert reply.status_code == 303 and reply.headers["location"].startswith("/login")
        assert client.get("/thumb?node=north&image=1").status_code == 401
        assert client.get("/api/broker").status_code == 401
        reply = client.post("/search", data={"text": TEXT, "k": "3"})
        assert reply.status_code == 303  # to the sign-in page, nothing searched


def test_session_cookie_is_httponly_strict_and_never_holds_the_token(console):
    with httpx.Client(base_url=console.url, timeout=30) as client:
        page = client.get("/login")
        reply = client.post("/login", data={"csrf": csrf_of(page.text), "token": TOKENS["alice"]})
        cookie = next(
            v for k, v in reply.headers.multi_items() if k == "set-cookie" and "fr_session=" in v
        )
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
        assert {"httponly", "samesite", "path"} <= attrs and "samesite=strict" in cookie.lower()
        assert "secure" not in attrs  # plain HTTP on loopback; [tls] turns it on
        assert TOKENS["alice"] not in cookie


def test_a_tampered_or_foreign_cookie_is_not_a_session(console):
    client = signed_in(console.url)
    good = client.cookies["fr_session"]
    payload, mac = good.split(".")
    forged = payload.replace(payload[5], "A" if payload[5] != "A" else "B", 1) + "." + mac
    for value in (forged, "x.y", good + "x"):
        with httpx.Client(base_url=console.url, cookies={"fr_session": value}) as other:
            assert other.get("/search").status_code == 303
    assert client.get("/search").status_code == 200


def test_posts_without_the_csrf_token_are_refused_and_not_run(console):
    client = signed_in(console.url)
    before = len(audit_lines(console))
    for data in ({"text": TEXT, "k": "3"}, {"text": TEXT, "k": "3", "csrf": "forged"}):
        reply = client.post("/search", data=data)
        assert reply.status_code == 403 and "CSRF check failed" in reply.text
    assert len(audit_lines(console)) == before  # no search happened
    with httpx.Client(base_url=console.url, timeout=30) as fresh:  # sign-in needs it too
        reply = fresh.post("/login", data={"csrf": "x", "token": TOKENS["alice"]})
        assert reply.status_code == 403 and "fr_session" not in reply.cookies


def test_sign_out_ends_the_session_even_for_a_copied_cookie(console):
    client = signed_in(console.url)
    copied = client.cookies["fr_session"]
    page = client.get("/search")
    assert client.post("/logout", data={"csrf": csrf_of(page.text)}).url.path == "/login"
    with httpx.Client(base_url=console.url, cookies={"fr_session": copied}) as thief:
        assert thief.get("/search").status_code == 303


def test_security_headers_on_every_response(console):
    client = signed_in(console.url)
    page = client.get("/search")
    for reply in (page, client.get("/static/console.css"), client.get("/nope")):
        csp = reply.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert reply.headers["x-content-type-options"] == "nosniff"
    assert client.get("/nope").status_code == 404
    assert "<script" not in page.text.replace('<script src="/static/console.js" defer>', "")


def test_results_belong_to_the_operator_who_searched(console):
    alice, bob = signed_in(console.url, "alice"), signed_in(console.url, "bob")
    page = alice.get("/search")
    reply = alice.post("/search", data={"csrf": csrf_of(page.text), "text": TEXT, "k": "3"})
    assert re.search(r"/results/[\w-]+$", reply.url.path)
    assert alice.get(reply.url.path).status_code == 200
    stolen = bob.get(reply.url.path)
    assert stolen.status_code == 404 and "no longer held" in stolen.text
    assert TEXT not in stolen.text


def test_export_is_byte_for_byte_the_query_commands_csv(console, broker, tmp_path):
    client = signed_in(console.url)
    page = client.get("/search")
    results = client.post("/search", data={"csrf": csrf_of(page.text), "text": TEXT, "k": "7"})
    export = client.post(results.url.path + "/export", data={"csrf": csrf_of(results.text)})
    assert export.headers["content-disposition"].startswith("attachment;")
    with grpc.insecure_channel(broker.address) as channel:
        direct = broker_pb2_grpc.BrokerServiceStub(channel).Search(
            broker_pb2.BrokerSearchRequest(text=TEXT, k=7),
            metadata=[("authorization", f"Bearer {TOKENS['alice']}")],
            timeout=30,
        )
    write_results_csv(direct, TEXT, tmp_path / "cli.csv")
    assert export.content == (tmp_path / "cli.csv").read_bytes()
    entry = audit_lines(console)[-1]
    assert entry["action"] == "export" and entry["hits"] == 7 and entry["operator"] == "alice"


def test_the_audit_log_accounts_for_searches_similar_thumbnails_and_refusals(console, fleet):
    client = signed_in(console.url, "bob")
    page = client.get("/search")
    results = client.post(
        "/search", data={"csrf": csrf_of(page.text), "text": TEXT, "k": "2", "camera": "south-cam1"}
    )
    node_id, image_id = re.search(r"/thumb\?node=(\w+)&amp;image=(\d+)", results.text).groups()
    assert client.get(f"/thumb?node={node_id}&image={image_id}&side=64").status_code == 200
    rid = results.url.path.rsplit("/", 1)[1]
    client.post(
        "/similar",
        data={"csrf": csrf_of(page.text), "node": node_id, "image": image_id, "from": rid},
    )
    client.post("/search", data={"csrf": csrf_of(page.text), "text": "", "k": "2"})
    mine = [e for e in audit_lines(console) if e["operator"] == "bob"][-5:]
    assert [e["action"] for e in mine] == [
        "sign_in",
        "search",
        "thumbnail",
        "find_similar",
        "search",
    ]
    _sign_in, search, thumb, similar, refused = mine
    assert search["query"]["text"] == TEXT and search["query"]["cameras"] == ["south-cam1"]
    assert search["hits"] == 2 and search["query_id"] and search["coverage"]["answered"] == 1
    assert (thumb["node_id"], thumb["image_id"]) == (node_id, int(image_id))
    assert similar["query"]["node_id"] == node_id and similar["hits"] == 2
    assert refused["outcome"] == "refused" and "`text` is empty" in refused["error"]
    assert all(e["remote"] == "127.0.0.1" and e["time"].endswith("+00:00") for e in mine)
    mode = stat.S_IMODE(os.stat(console.folder / "audit.jsonl").st_mode)
    assert mode == 0o600


def test_a_search_that_cannot_be_audited_is_not_run(broker, tmp_path):
    running = start_console(write_console_config(tmp_path, broker.address))
    try:
        client = signed_in(running.url)
        page = client.get("/search")
        (tmp_path / "audit.jsonl").unlink()
        (tmp_path / "audit.jsonl").mkdir()  # the log's path is now unwritable
        reply = client.post("/search", data={"csrf": csrf_of(page.text), "text": TEXT, "k": "3"})
        assert reply.status_code == 503 and "audit log" in reply.text
        assert "/results/" not in str(reply.url) and "Traceback" not in reply.text
    finally:
        running.stop()


def test_the_audit_log_is_appended_to_across_restarts(broker, tmp_path):
    write_console_config(tmp_path, broker.address)
    (tmp_path / "audit.jsonl").write_text('{"operator":"earlier","action":"search"}\n')
    running = start_console(tmp_path / "console.toml")
    try:
        signed_in(running.url, "bob")
    finally:
        running.stop()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["operator"] == "earlier"
    assert json.loads(lines[-1])["action"] == "sign_in"


def test_failed_sign_ins_are_throttled_per_address(broker, tmp_path):
    running = start_console(
        write_console_config(tmp_path, broker.address, **{"max-failed-sign-ins": 2})
    )
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            codes = []
            for token in ("wrong-1", "wrong-2", TOKENS["alice"]):
                page = client.get("/login")
                codes.append(
                    client.post(
                        "/login", data={"csrf": csrf_of(page.text), "token": token}
                    ).status_code
                )
        assert codes == [401, 401, 429]  # even the right token waits out the minute
    finally:
        running.stop()


# ---------------------------------------------------------------- config and command


def operators_dir(tmp_path: Path) -> dict[str, str]:
    for name, token in TOKENS.items():
        (tmp_path / f"{name}.token").write_text(token)
    return {name: f"{name}.token" for name in TOKENS}


def test_config_refuses_insecure_or_ambiguous_setups(tmp_path):
    ops = operators_dir(tmp_path)
    base = {"operators": ops}
    with pytest.raises(ConfigError, match="not a loopback address"):
        console_config_from_dict({**base, "listen": "0.0.0.0:8470"}, tmp_path)
    assert (
        console_config_from_dict(
            {**base, "listen": "0.0.0.0:8470", "allow_insecure_http": True}, tmp_path
        ).host
        == "0.0.0.0"
    )
    with pytest.raises(ConfigError, match="no \\[operators\\]"):
        console_config_from_dict({}, tmp_path)
    with pytest.raises(ConfigError, match="`admins` names no operator: carol"):
        console_config_from_dict({**base, "admins": ["carol"]}, tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        console_config_from_dict({**base, "listen_port": 1}, tmp_path)
    (tmp_path / "bob.token").write_text(TOKENS["alice"])
    with pytest.raises(ConfigError, match="share one token"):
        read_operators(console_config_from_dict(base, tmp_path))
    (tmp_path / "bob.token").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        read_operators(console_config_from_dict(base, tmp_path))
    default = console_config_from_dict(base, tmp_path)
    assert default.host == "127.0.0.1"  # secure by default
    assert Path(default.audit_log).parent == tmp_path  # beside the config, not in the cwd


def test_example_config_parses(tmp_path):
    example = ROOT / "server" / "console" / "console.example.toml"
    copy = tmp_path / "console.toml"
    copy.write_text(example.read_text())
    (tmp_path / "tokens").mkdir()
    config = load_console_config(copy)
    assert config.listen.startswith("127.0.0.1:") and config.admins == ("alice",)
    assert set(config.operators) == {"alice", "bob"}


def read_line_with(process: subprocess.Popen, needle: str, deadline_s: float) -> str:
    """The first output line holding `needle`, waiting at most `deadline_s`. A thread reads
    (select() on a buffered pipe misses lines already read into the buffer)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + deadline_s
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {deadline_s} s; output: {''.join(seen)[-2000:]}")


def test_fedretrieve_console_command_serves_the_sign_in_page(broker, tmp_path):
    config = write_console_config(tmp_path, broker.address)
    process = subprocess.Popen(
        [sys.executable, "-m", "sims.cli", "console", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = read_line_with(process, "console listening on", deadline_s=120)
        match = re.search(r"console listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        reply = httpx.get(match.group(1) + "/login", timeout=30)
        assert reply.status_code == 200 and "Operator token" in reply.text
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
            raise AssertionError("`fedretrieve console` did not stop on SIGTERM in 60 s") from None
    assert (tmp_path / "session.secret").stat().st_mode & 0o077 == 0


def test_a_bad_config_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "console.toml").write_text(
        'listen = "0.0.0.0:1"\n[operators]\na = "missing.token"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "sims.cli", "console", "--config", str(tmp_path / "console.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not a loopback address" in done.stderr


def test_minimum_score_hides_the_weaker_hits_and_says_how_many(console, broker):
    with grpc.insecure_channel(broker.address) as channel:
        direct = broker_pb2_grpc.BrokerServiceStub(channel).Search(
            broker_pb2.BrokerSearchRequest(text=TEXT, k=8),
            metadata=[("authorization", f"Bearer {TOKENS['alice']}")],
            timeout=30,
        )
    threshold = direct.hits[3].score  # keep the best four
    client = signed_in(console.url)
    page = client.get("/search")
    reply = client.post(
        "/search",
        data={"csrf": csrf_of(page.text), "text": TEXT, "k": "8", "min_score": repr(threshold)},
    )
    shown = re.findall(r'<li class="tile">', reply.text)
    kept = sum(1 for h in direct.hits if h.score >= threshold)
    assert len(shown) == kept >= 4
    assert f"{8 - kept} more hits scored below the minimum score" in reply.text


def test_sign_in_returns_only_to_pages_of_this_console(console):
    for target, landing in (("/fleet", "/fleet"), ("//elsewhere.example/x", "/search"),
                            ("https://elsewhere.example/", "/search")):  # fmt: skip
        with httpx.Client(base_url=console.url, timeout=30) as client:
            page = client.get("/login", params={"next": target})
            reply = client.post(
                "/login",
                data={"csrf": csrf_of(page.text), "token": TOKENS["bob"], "next": target},
            )
            assert reply.status_code == 303 and reply.headers["location"] == landing, target
