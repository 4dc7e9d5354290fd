"""docs/node.md's probe and grpcurl commands work as written, against a real node.

Every `grpcurl ...` and `python -c ...` command quoted in docs/node.md is run (HOST:50051
and TOKEN replaced by this node's address and token) and must succeed with a real answer;
the hand-over path it names is the one `edge_node.fl.task` writes (issue 17, item 12).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from node_fixtures import TOKEN

from edge_node.fl.task import HANDOVER_NAME

ROOT = Path(__file__).resolve().parents[2]
NODE_MD = ROOT / "docs" / "node.md"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(120)


def documented_commands() -> list[str]:
    text = NODE_MD.read_text()
    return re.findall(r"`((?:grpcurl|python -c) [^`]+)`", text)


def expected_output(command: str) -> str:
    """A regex for what a working run of `command` prints (field names are JSON names with
    `-proto`, proto names through reflection)."""
    if "Health" in command:
        return "SERVING"
    if command.rstrip().endswith(" list"):
        return "fedretrieve.v1.NodeService"
    if "NodeService/Search" in command:
        return r'"(modelVersion|model_version)": "tiny@'
    if "NodeService/Status" in command:
        return r'"(nodeId|node_id)": "node-a"'
    raise AssertionError(f"docs/node.md quotes a command this test does not know: {command}")


def test_node_md_quotes_the_probe_and_grpcurl_forms():
    commands = documented_commands()
    assert any(c.startswith("python -c") and "Health" in c for c in commands)  # no token
    assert any("Health/Check" in c and "authorization" in c for c in commands)  # grpcurl
    assert any("-proto protos/node.proto" in c for c in commands)  # without reflection


@pytest.mark.skipif(shutil.which("grpcurl", path=str(BIN)) is None, reason="grpcurl not installed")
@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_works_against_a_real_node(serve_node, command):
    served = serve_node()
    address = f"127.0.0.1:{served.port}"
    concrete = command.replace("HOST:50051", address).replace("TOKEN", TOKEN)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(
        ["bash", "-c", concrete],
        cwd=ROOT,  # the docs say: from the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, f"{concrete}\n{run.stdout}\n{run.stderr}"
    assert re.search(expected_output(command), run.stdout), run.stdout


def test_handover_path_is_the_one_the_client_writes():
    text = NODE_MD.read_text()
    assert f"<adapter-dir>/{HANDOVER_NAME}/" in text
    assert "round-<R>" not in text
