"""The same Flower app on the deployment engine: a SuperLink and two SuperNodes as separate
processes on loopback, driven by `flwr run`, offline (no dependency installation).

Each SuperNode gets its own `--node-config` (data, node id, adapter dir), as a Jetson
would; the test checks that the run finishes, the server saved the global adapters and
both nodes received the final adapter in their adapter dirs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.adapters import read_manifest
from common.factory import create_model

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"port {port} not open after {timeout}s:\n{log.read_text()[-3000:]}")


def _http_api() -> bool:
    """Flower >= 1.3x serves Fleet/Control over one HTTP port (--host/--port)."""
    out = subprocess.run(
        [BIN / "flower-superlink", "--help"], capture_output=True, text=True, timeout=60
    )
    return "--port" in out.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_supernodes_on_loopback_finish_a_run(tmp_path, tiny_dataset):
    data = tiny_dataset
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec, flwr-*
        "HF_HUB_OFFLINE": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    http = _http_api()
    link_port = _free_port()
    if http:
        link_args = ["--host", "127.0.0.1", "--port", str(link_port)]
        control = f"127.0.0.1:{link_port}"
    else:  # Flower 1.30: gRPC Fleet / Control / ServerAppIo APIs
        control = f"127.0.0.1:{_free_port()}"
        link_args = [
            "--fleet-api-address",
            f"127.0.0.1:{link_port}",
            "--control-api-address",
            control,
            "--serverappio-api-address",
            f"127.0.0.1:{_free_port()}",
        ]
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n'
        f'[superlink.loopback]\naddress = "{control}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen] = []

    def start(args: list, log: Path) -> subprocess.Popen:
        fh = log.open("w")
        proc = subprocess.Popen(
            args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    try:
        link_log = tmp_path / "superlink.log"
        link = start(
            [
                BIN / "flower-superlink",
                "--insecure",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                *link_args,
            ],
            link_log,
        )
        _wait_for_port(link_port, link, link_log)
        for i in range(2):
            node_port = _free_port()
            node_args = (
                ["--port", str(node_port)]
                if http
                else ["--clientappio-api-address", f"127.0.0.1:{node_port}"]
            )
            node_config = (
                f"data-path='{data}' node-id='node{i}' adapter-dir='{tmp_path / f'adapters{i}'}' "
                "threads=1"
            )
            start(
                [
                    BIN / "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--node-config",
                    node_config,
                    *node_args,
                ],
                tmp_path / f"supernode{i}.log",
            )
        run_config = (
            f"model='tiny' num-server-rounds=1 max-steps=2 batch-size=8 fraction-evaluate=0.0 "
            f"out-dir='{out}' eval-data='{data}' round-timeout=300.0"
        )
        run = subprocess.run(
            [BIN / "flwr", "run", str(ROOT), "loopback", "--run-config", run_config, "--stream"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        history_path = out / "history.json"
        deadline = time.monotonic() + 60  # --stream returns once the run is done
        while "final" not in (
            json.loads(history_path.read_text()) if history_path.exists() else {}
        ):
            assert time.monotonic() < deadline, run.stdout[-3000:]
            time.sleep(1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)

    history = json.loads(history_path.read_text())
    (round1,) = history["rounds"][1:]
    assert sorted(round1["accepted"]) == ["node0", "node1"]
    assert read_manifest(out / "round-001").round == 1
    create_model("tiny", adapter=out / "final")  # loadable
    final = read_manifest(out / "final").adapter_fingerprint
    assert sorted(history["handover"]) == ["node0", "node1"]
    for i in range(2):
        assert read_manifest(tmp_path / f"adapters{i}" / "federated").adapter_fingerprint == final
