"""Broker config: the example file loads; bad files fail at start, naming the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.errors import ConfigError
from server.broker.config import load_broker_config

EXAMPLE = Path(__file__).resolve().parents[2] / "server" / "broker" / "broker.example.toml"

MINIMAL = """
listen = "127.0.0.1:0"
operator-tokens = ["t"]
[[nodes]]
id = "a"
address = "127.0.0.1:1"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def test_example_file_loads_with_every_documented_key(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "broker.toml")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "node-b.token").write_text("from-a-file\n")
    config = load_broker_config(tmp_path / "broker.toml")
    assert [n.id for n in config.nodes] == ["node-a", "node-b"]
    assert config.nodes[1].token == "from-a-file"
    assert config.model == "default" and config.metrics_port == 9470
    assert config.operator_tokens == ("change-me",)


def test_minimal_file_gets_defaults(tmp_path):
    config = load_broker_config(write(tmp_path, MINIMAL))
    assert config.default_k == 20 and config.merge_margin_ms == 20 and config.model is None


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("deadline-msec = 5\n", "unknown key(s) deadline-msec"),
        ('[[nodes]]\nid = "b"\naddress = "x:1"\nport = 3\n', "unknown key(s) port"),
        ('[[nodes]]\nid = "a"\naddress = "127.0.0.1:2"\n', "duplicate node id"),
        ('[[nodes]]\nid = "c"\naddress = "nocolon"\n', "host:port"),
        ('default-k = "many"\n', "default-k"),
        ("merge-margin-ms = 5000\n", "leaves no time"),
        ("max-k = 0\n", "`max-k` must be positive"),
        ('adapter = "somewhere"\n', "needs its base"),
        ("retry-max-attempts = 9\n", "1..5"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(tmp_path, extra, needle):
    head, nodes = MINIMAL.split("[[nodes]]", 1)
    text = head + (extra if not extra.startswith("[[") else "") + "[[nodes]]" + nodes
    if extra.startswith("[["):
        text += extra
    with pytest.raises(ConfigError) as err:
        load_broker_config(write(tmp_path, text))
    assert needle in str(err.value)
    assert "broker.toml" in str(err.value)


def test_no_tokens_needs_an_explicit_open_broker(tmp_path):
    text = MINIMAL.replace('operator-tokens = ["t"]', "")
    with pytest.raises(ConfigError, match="allow-unauthenticated"):
        load_broker_config(write(tmp_path, text))
    opened = text.replace(
        'listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\nallow-unauthenticated = true'
    )
    assert load_broker_config(write(tmp_path, opened)).operator_tokens == ()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_broker_config(tmp_path / "nope.toml")
    text = MINIMAL.replace(
        'address = "127.0.0.1:1"', 'address = "127.0.0.1:1"\ntoken-file = "missing.token"'
    )
    with pytest.raises(ConfigError, match=r"missing\.token"):
        load_broker_config(write(tmp_path, text))
    text = MINIMAL + '[tls]\ncert = "c.pem"\nkey = "k.pem"\n'
    with pytest.raises(ConfigError, match=r"c\.pem"):
        load_broker_config(write(tmp_path, text))
