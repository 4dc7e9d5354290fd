"""`fedretrieve query` end to end: real broker and scripted nodes on loopback."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone

import grpc
import pytest
from broker_fixtures import OPERATOR_TOKEN, ScriptedNode, broker_config, closed_port_address
from PIL import Image

from common.errors import InvalidQuery
from server.operator.cli import parse_time
from sims.cli import main

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker_addr(scripted_nodes, start_broker, tmp_path):
    a, b = scripted_nodes(
        ScriptedNode("node-a", [(1, 0.91), (2, 0.40)]),
        ScriptedNode("node-b", [(7, 0.85), (8, 0.10)]),
    )
    handle = start_broker(broker_config({"node-a": a.address, "node-b": b.address}))
    (tmp_path / "token").write_text(OPERATOR_TOKEN + "\n")
    return handle.address


def query(addr, tmp_path, *extra):
    return main(
        [
            "query",
            "a man with a blue backpack",
            "--broker",
            addr,
            "--token-file",
            str(tmp_path / "token"),
            *extra,
        ]
    )


def test_table_lists_ranked_hits_and_the_coverage_line(broker_addr, tmp_path, capsys):
    assert query(broker_addr, tmp_path, "-k", "3") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:6] == ["rank", "score", "node", "camera", "time", "image"]
    assert out[1].split()[:4] == ["1", "0.9100", "node-a", "cam-node-a"]
    assert out[2].split()[:3] == ["2", "0.8500", "node-b"]
    assert out[3].split()[:3] == ["3", "0.4000", "node-a"]
    assert out[4].startswith("coverage: 2/2 nodes answered;") and "merge=score" in out[4]


def test_json_prints_the_full_response(broker_addr, tmp_path, capsys):
    assert query(broker_addr, tmp_path, "-k", "2", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [h["imageId"] for h in data["hits"]] == ["1", "7"]  # int64 as JSON strings
    assert data["coverage"]["nodesAnswered"] == 2 and data["merge"] == "score"
    assert {n["nodeId"] for n in data["coverage"]["nodes"]} == {"node-a", "node-b"}


def test_csv_is_the_results_file_and_sheet_is_a_png(broker_addr, tmp_path, capsys):
    out_csv, out_png = tmp_path / "res" / "results.csv", tmp_path / "sheet.png"
    assert (
        query(broker_addr, tmp_path, "-k", "4", "--csv", str(out_csv), "--sheet", str(out_png)) == 0
    )
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["image"] for r in rows] == [
        "node-a_1.jpg",
        "node-b_7.jpg",
        "node-a_2.jpg",
        "node-b_8.jpg",
    ]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"] and rows[0]["score"] == "0.910000"
    assert rows[0]["query"] == "a man with a blue backpack" and rows[0]["node_id"] == "node-a"
    sheet = Image.open(out_png)
    assert sheet.format == "PNG" and sheet.width > 4 * 128 and sheet.height > 128
    # the first tile holds the node's red thumbnail, not the grey "unavailable" tile
    r, g, _ = sheet.getpixel((8 + 64, 8 + 64))
    assert r > 150 and g < 90
    assert "contact sheet:" in capsys.readouterr().err


def test_missing_thumbnail_is_drawn_grey_and_reported(
    scripted_nodes, start_broker, tmp_path, capsys
):
    (a,) = scripted_nodes(ScriptedNode("a", [(1, 0.5), (2, 0.4)], no_thumbnail={2}))
    handle = start_broker(broker_config({"a": a.address}))
    (tmp_path / "token").write_text(OPERATOR_TOKEN)
    assert query(handle.address, tmp_path, "--sheet", str(tmp_path / "s.png")) == 0
    err = capsys.readouterr().err
    assert "1 thumbnails unavailable: a/2" in err and "NOT_FOUND" not in err.split("a/2")[0]
    sheet = Image.open(tmp_path / "s.png")
    assert sheet.getpixel((8 + 128 + 8 + 2, 8 + 2)) == (200, 200, 200)  # second tile: grey


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["query", "   "], "query text is empty"),
        (["query", "red", "--since", "2024-05-02", "--until", "2024-05-01"], "bad time range"),
        (["query", "red", "--since", "yesterday-ish"], "is not a time"),
        (["query", "red", "-k", "0"], "-k must be positive"),
    ],
)
def test_bad_operator_input_is_one_clear_line(args, needle, capsys):
    assert main([*args, "--broker", closed_port_address()]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unreachable_broker(capsys):
    code = main(
        [
            "query",
            "red",
            "--broker",
            closed_port_address(),
            "--token",
            "x",
            "--connect-timeout",
            "0.5",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot reach the broker" in err and "Traceback" not in err


def test_refused_token_and_missing_token(broker_addr, capsys):
    assert main(["query", "red", "--broker", broker_addr, "--token", "wrong"]) == 2
    assert "refused the operator token (check the token)" in capsys.readouterr().err
    assert main(["query", "red", "--broker", broker_addr]) == 2
    assert "--token-file" in capsys.readouterr().err


def test_broker_side_rejection_is_reported(broker_addr, tmp_path, capsys):
    assert query(broker_addr, tmp_path, "--nodes", "node-a,ghost") == 2
    assert "unknown node id(s) ['ghost']" in capsys.readouterr().err


def test_parse_time_forms():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert parse_time(None, flag="--since") == 0
    assert parse_time("1714564800000", flag="--since") == 1714564800000
    assert parse_time("2h", flag="--since", now=now) == int(now.timestamp() * 1000) - 7_200_000
    assert parse_time("2024-05-01T12:00:00Z", flag="--since") == int(now.timestamp() * 1000)
    with pytest.raises(InvalidQuery, match="--until"):
        parse_time("soon", flag="--until")


def test_broker_serve_with_a_bad_config_is_one_clear_line(tmp_path, capsys):
    assert main(["broker", "serve", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and "Traceback" not in err
    (tmp_path / "b.toml").write_text(
        'listen = "127.0.0.1:0"\nmystery = 1\n[[nodes]]\nid="a"\naddress="h:1"\n'
    )
    assert main(["broker", "serve", "--config", str(tmp_path / "b.toml")]) == 2
    assert "unknown key(s) mystery" in capsys.readouterr().err


# ------------------------------------------------------------------ issue 17, item 11
@pytest.mark.parametrize(
    ("flag", "path", "needle"),
    [
        ("--csv", "{tmp}", "is a directory"),
        ("--sheet", "{tmp}", "is a directory"),
        ("--sheet", "{tmp}/missing/dir/x.png", "does not exist"),
        ("--csv", "{tmp}/token/x.csv", "is not a directory"),  # parent is a file
    ],
)
def test_unusable_output_path_is_one_line_before_querying(
    scripted_nodes, start_broker, tmp_path, capsys, flag, path, needle
):
    (a,) = scripted_nodes(ScriptedNode("a", [(1, 0.5)]))
    handle = start_broker(broker_config({"a": a.address}))
    (tmp_path / "token").write_text(OPERATOR_TOKEN)
    out = path.format(tmp=tmp_path)
    assert query(handle.address, tmp_path, flag, out) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert needle in err and flag in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and captured.out == ""
    assert not a.servicer.calls  # refused before any query reached a node
    assert not (tmp_path / "missing").exists()  # no directories created on the way


class HostileNode(ScriptedNode):
    """Names its files and cameras, and fails its searches, with terminal escape sequences."""

    def Search(self, request, context):
        response = super().Search(request, context)
        for hit in response.hits:
            hit.file_name = "\x1b]0;owned\x07crop\x1b[2J.jpg"
            hit.camera_id = "cam\x1b[31m\u202e1"
        return response


class FailingHostileNode(ScriptedNode):
    def Search(self, request, context):
        context.abort(grpc.StatusCode.INTERNAL, "boom\x1b[1A\x1b[2K\rcoverage: 9/9 nodes answered")


def test_nothing_a_node_sends_reaches_the_terminal_raw(
    scripted_nodes, start_broker, tmp_path, capsys
):
    good, bad = scripted_nodes(
        HostileNode("a", [(1, 0.9)]), FailingHostileNode("b\x1b[8m", [(2, 0.5)])
    )
    handle = start_broker(broker_config({"a": good.address, "b": bad.address}))
    (tmp_path / "token").write_text(OPERATOR_TOKEN)
    assert query(handle.address, tmp_path) == 0
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\r\u202e"), repr(out)
    assert "\\x1b]0;owned\\x07crop\\x1b[2J.jpg" in out  # shown, visibly escaped
    assert "cam\\x1b[31m\\u202e1" in out
    assert "boom\\x1b[1A\\x1b[2K\\x0dcoverage: 9/9" in out  # the node's error, defused
    assert len(out.splitlines()) == 3  # header, one hit, the coverage line: nothing forged
    assert query(handle.address, tmp_path, "--json") == 0
    assert "\x1b" not in capsys.readouterr().out  # JSON escapes control characters itself


def test_broker_error_details_are_sanitised(scripted_nodes, start_broker, tmp_path, capsys):
    (bad,) = scripted_nodes(FailingHostileNode("b", [(2, 0.5)]))
    handle = start_broker(broker_config({"b": bad.address}))
    (tmp_path / "token").write_text(OPERATOR_TOKEN)
    assert query(handle.address, tmp_path) == 2  # no node answered: UNAVAILABLE, one line
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err and "boom\\x1b[1A" in err, repr(err)
    assert "Traceback" not in err
