"""The one launcher of node daemons for the simulation and benchmarks: real processes on
loopback, ports chosen by the daemons themselves, failures reported with the node's log."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from common.errors import Unavailable
from edge_node.config import load_node_config
from protos import node_pb2
from sims.node_process import start_node_processes, write_node_config


def test_written_config_is_what_the_daemon_loads(tmp_path):
    files = write_node_config(
        tmp_path / "n1",
        "n1",
        model="tiny",
        torch_threads=1,
        sections={"limits": {"max-k": 7}, "index": {"save-interval-s": 2.5}},
    )
    config = load_node_config(files.config_path)
    assert config.node_id == "n1"
    assert config.listen == "127.0.0.1:0"
    assert config.limits.max_k == 7
    assert config.index.save_interval_s == 2.5
    assert config.adapter_dir == files.adapter_dir and files.adapter_dir.is_dir()
    assert len(files.token) == 32 and (tmp_path / "n1" / "token").read_text() == files.token


@pytest.mark.slow
def test_two_daemons_start_on_their_own_ports_and_stop_cleanly(tmp_path):
    files = [write_node_config(tmp_path / n, n, model="tiny", torch_threads=1) for n in "ab"]
    nodes = start_node_processes(files, ready_timeout_s=120)
    try:
        addresses = {n.address for n in nodes}
        assert len(addresses) == 2
        assert all(a.startswith("127.0.0.1:") and not a.endswith(":0") for a in addresses)
        for node in nodes:
            assert node.status(timeout=10).node_id == node.node_id
            with pytest.raises(grpc.RpcError) as refused:  # the token is really required
                node.stub.Status(node_pb2.StatusRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        for node in nodes:
            node.stop()
    assert [n.proc.returncode for n in nodes] == [0, 0]  # SIGTERM = graceful shutdown


def test_a_node_that_cannot_start_fails_with_its_log(tmp_path):
    good = write_node_config(tmp_path / "ok", "ok", model="tiny", torch_threads=1)
    bad = write_node_config(tmp_path / "bad", "bad", model="no-such-model", torch_threads=1)
    with pytest.raises(Unavailable) as err:
        start_node_processes([good, bad], ready_timeout_s=120)
    message = str(err.value)
    assert "node bad exited" in message and "no-such-model" in message
    # the node that did start is stopped with the one that failed: no daemon is left
    assert not _processes_running(str(good.config_path))


def _processes_running(needle: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended while we looked
            continue
        if needle in args:
            found.append(cmdline.parent.name)
    return found
