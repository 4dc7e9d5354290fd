"""The one client-side way to read a token and open a channel (query, ingest, console)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import ConfigError
from common.rpc.client import open_channel, read_token
from common.rpc.server import add_health_and_reflection, bind


def test_token_file_beats_flag_beats_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FR_TEST_TOKEN", "from-env")
    (tmp_path / "t").write_text("from-file\n")
    assert read_token("from-flag", str(tmp_path / "t"), "FR_TEST_TOKEN") == "from-file"
    assert read_token("from-flag", None, "FR_TEST_TOKEN") == "from-flag"
    assert read_token(None, None, "FR_TEST_TOKEN") == "from-env"
    monkeypatch.delenv("FR_TEST_TOKEN")
    assert read_token(None, None, "FR_TEST_TOKEN") is None
    with pytest.raises(ConfigError, match="--token-file .*missing"):
        read_token(None, str(tmp_path / "missing"), "FR_TEST_TOKEN")


def test_bad_channel_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match="host:port"):
        open_channel("localhost")
    with pytest.raises(ConfigError, match="--tls-cert, --tls-key"):
        open_channel("127.0.0.1:1", cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="cannot read"):
        open_channel("127.0.0.1:1", ca=tmp_path / "missing-ca.pem")


def test_a_plaintext_channel_reaches_a_loopback_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_health_and_reflection(server, [])
    port = bind(server, "127.0.0.1:0")
    server.start()
    try:
        with open_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)
