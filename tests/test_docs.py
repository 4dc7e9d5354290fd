"""Docs that were wrong when followed stay right (issue 17, item 12).

Static checks of docs/federated.md and docs/acceleration.md (paths that exist, absolute
certificate paths, PATH set before Flower's processes start), and the broker's "Run it"
steps actually run: copy the example config, create what the docs say, load it.
(docs/node.md's commands are run against a real node in tests/edge_node/test_node_docs.py.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from server.broker.config import load_broker_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TOP_LEVEL = ("common", "docs", "edge_node", "protos", "server", "sims", "tests", "deploy")
REPO_PATH = re.compile(
    rf"`((?:{'|'.join(TOP_LEVEL)})/[\w./-]*\w\.(?:py|md|toml|proto|service|json))`"
)


def fenced_blocks(text: str) -> list[tuple[int, str]]:
    """(offset, body) of every ``` block."""
    return [(m.start(), m.group(1)) for m in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S)]


@pytest.mark.parametrize(
    "name", ["federated.md", "acceleration.md", "node.md", "broker.md", "compress.md"]
)
def test_files_the_docs_point_at_exist(name):
    text = (DOCS / name).read_text()
    assert "/work/notes" not in text  # notes outside the repository are not documentation
    missing = [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    assert not missing, f"docs/{name} names files that do not exist: {missing}"


def test_root_certificates_paths_are_absolute():
    text = (DOCS / "federated.md").read_text()
    values = re.findall(r'root-certificates\s*=\s*"([^"]*)"', text)
    assert values, "docs/federated.md shows no root-certificates setting"
    assert all(v.startswith("/") for v in values), values


def test_flower_processes_start_with_the_venv_on_path():
    """flower-superlink/-supernode start `flower-superexec` by name: every block that starts
    one sets PATH itself or follows a paragraph that says to."""
    text = (DOCS / "federated.md").read_text()
    starting = [
        (at, body)
        for at, body in fenced_blocks(text)
        if re.search(r"^flower-super(link|node)\b", body, re.M)
    ]
    assert starting
    for at, body in starting:
        before = text[:at].rstrip().rsplit("\n\n", 1)[-1]  # the paragraph above the block
        assert "PATH" in body or "PATH" in before, body[:200]


def broker_setup_lines() -> list[str]:
    """The commands of docs/broker.md's "Run it" block before `broker serve`."""
    text = (DOCS / "broker.md").read_text()
    section = text.split("## Run it", 1)[1]
    body = fenced_blocks(section)[0][1]
    lines = []
    for line in body.splitlines():
        if "broker serve" in line:
            return lines
        if line.strip():
            lines.append(line.split("  #", 1)[0].strip())
    raise AssertionError("docs/broker.md's Run it block has no `broker serve` line")


def test_broker_example_config_works_when_copied_as_documented(tmp_path):
    example = ROOT / "server" / "broker" / "broker.example.toml"
    lines = [
        line.replace("server/broker/broker.example.toml", str(example))
        for line in broker_setup_lines()
    ]
    assert lines[0].startswith("cp ")
    run = subprocess.run(
        ["bash", "-ec", "\n".join(lines)], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stderr
    config = load_broker_config(tmp_path / "broker.toml")
    assert {n.id: bool(n.token) for n in config.nodes} == {"node-a": True, "node-b": True}
