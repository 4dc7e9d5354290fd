"""The same Flower app on the deployment engine: a SuperLink and two SuperNodes as separate
processes on loopback, driven by `flwr run`, offline (no dependency installation).

Each SuperNode gets its own `--node-config` (data, node id, adapter dir), as a Jetson
would; the test checks that the run finishes, the server saved the global adapters and
both nodes received the final adapter in their adapter dirs.
"""

from __future__ import annotations

import json
import os
import random
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


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _reserve_ports(n: int) -> list[int]:
    """`n` distinct loopback ports, free a moment ago, for processes that take a port number
    on their command line (SuperLink, SuperNode) and cannot report one they bound themselves.

    A port from bind(0) is an ephemeral one, which the kernel hands again to the next bind(0)
    or outgoing connection: every other gRPC server and client of this test run could take it
    between our release and the child's bind. The ports drawn here lie below the ephemeral
    range, which the kernel never hands out by itself; they are drawn at random (another run
    of this test at the same time draws others) and held bound together, so they are
    distinct. A child that still loses its port is restarted on others (`_start_listening`).
    """
    low, _ = _ephemeral_range()
    pool = range(max(1024, low - 12000), low) if low > 2048 else None
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    try:
        for _ in range(200 * n):
            if len(held) == n:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", rng.choice(pool) if pool else 0))
            except OSError:  # taken (or lingering in TIME_WAIT): draw another
                sock.close()
                continue
            held.append(sock)
        assert len(held) == n, f"no {n} free loopback ports below {low}"
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def _listens(proc: subprocess.Popen, port: int) -> bool:
    """Whether `proc` itself listens on 127.0.0.1:`port` (not merely: something does)."""
    try:
        inodes = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
        fds = Path(f"/proc/{proc.pid}/fd")
        return any(os.readlink(fd) in inodes for fd in fds.iterdir()) if inodes else False
    except OSError:  # no procfs (not Linux), or the process just exited: ask the port
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0 and proc.poll() is None


def _wait_listening(
    ports: list[int], proc: subprocess.Popen, log: Path, timeout: float = 90
) -> bool:
    """True once `proc` listens on every port; False if it exited because one was taken."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text()
            if "address already in use" in text.lower():
                return False
            raise AssertionError(f"process exited ({proc.returncode}):\n{text[-3000:]}")
        if all(_listens(proc, port) for port in ports):
            return True
        time.sleep(0.3)
    raise AssertionError(f"ports {ports} not open after {timeout}s:\n{log.read_text()[-3000:]}")


def _start_listening(start, args_for, n_ports: int, log: Path, attempts: int = 3):
    """Start `start(args_for(ports), log)` on `n_ports` reserved ports and wait until it
    listens on them; again on fresh ports if one was taken meanwhile. -> (proc, ports)."""
    for attempt in range(attempts):
        ports = _reserve_ports(n_ports)
        attempt_log = log.with_name(f"{log.stem}-{attempt}{log.suffix}")
        proc = start(args_for(ports), attempt_log)
        if _wait_listening(ports, proc, attempt_log):
            return proc, ports
    raise AssertionError(f"{log.stem}: its ports were taken {attempts} times in a row")


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
    procs: list[subprocess.Popen] = []

    def start(args: list, log: Path) -> subprocess.Popen:
        with log.open("w") as fh:  # the child holds its own copy of the descriptor
            proc = subprocess.Popen(
                args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                start_new_session=True,
            )  # fmt: skip
        procs.append(proc)
        return proc

    def link_args(ports: list[int]) -> list:
        if http:  # Flower >= 1.3x: Fleet and Control over one HTTP port
            api = ["--host", "127.0.0.1", "--port", str(ports[0])]
        else:  # Flower 1.30: gRPC Fleet / Control / ServerAppIo APIs
            fleet, control, serverappio = (f"127.0.0.1:{p}" for p in ports)
            api = [
                "--fleet-api-address", fleet,
                "--control-api-address", control,
                "--serverappio-api-address", serverappio,
            ]  # fmt: skip
        return [
            BIN / "flower-superlink",
            "--insecure",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            *api,
        ]

    try:
        _, link_ports = _start_listening(
            start, link_args, 1 if http else 3, tmp_path / "superlink.log"
        )
        link_port, control = link_ports[0], f"127.0.0.1:{link_ports[0 if http else 1]}"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "{control}"\ninsecure = true\n'
        )
        for i in range(2):
            node_config = (
                f"data-path='{data}' node-id='node{i}' adapter-dir='{tmp_path / f'adapters{i}'}' "
                "threads=1"
            )

            def node_args(ports: list[int], node_config=node_config) -> list:
                api = (
                    ["--port", str(ports[0])]
                    if http
                    else ["--clientappio-api-address", f"127.0.0.1:{ports[0]}"]
                )
                return [
                    BIN / "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--node-config",
                    node_config,
                    *api,
                ]

            _start_listening(start, node_args, 1, tmp_path / f"supernode{i}.log")
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


def _three_node_dataset(root: Path, make_dataset) -> Path:
    data = make_dataset(root, identities=18)
    path = data / "annotations.json"
    entries = json.loads(path.read_text())
    for i, entry in enumerate(entries):
        entry["node"] = f"node{i % 3}"
    path.write_text(json.dumps(entries))
    return data


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "kill",
    [pytest.param(False, marks=pytest.mark.redundant), True],
    ids=["all-nodes", "one-killed-mid-round"],
)
def test_secagg_deployment_on_three_supernodes(tmp_path, make_dataset, kill):
    """SecAgg+ over a real SuperLink and three SuperNodes; with `kill`, node2 is killed
    (SIGKILL) once it is in the masked-vector stage, after the keys were shared.

    Only the kill case runs by default (83 s of the suite's budget saved): the all-nodes
    SecAgg+ path is the same protocol without the drop, and runs in-process in
    tests/integration/test_flower_privacy.py; `-m redundant` runs it here too.
    """
    data = _three_node_dataset(tmp_path / "data", make_dataset)
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    http = _http_api()
    procs: list[subprocess.Popen] = []
    node_procs: list[tuple[subprocess.Popen, Path]] = []

    def start(args: list, log: Path) -> subprocess.Popen:
        with log.open("w") as fh:
            proc = subprocess.Popen(
                args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                start_new_session=True,
            )  # fmt: skip
        procs.append(proc)
        return proc

    def link_args(ports: list[int]) -> list:
        if http:
            api = ["--host", "127.0.0.1", "--port", str(ports[0])]
        else:
            fleet, control, serverappio = (f"127.0.0.1:{p}" for p in ports)
            api = [
                "--fleet-api-address", fleet,
                "--control-api-address", control,
                "--serverappio-api-address", serverappio,
            ]  # fmt: skip
        return [
            BIN / "flower-superlink", "--insecure", "--isolation", "subprocess",
            "--disable-runtime-dependency-installation", *api,
        ]  # fmt: skip

    history_path = out / "history.json"
    try:
        _, link_ports = _start_listening(
            start, link_args, 1 if http else 3, tmp_path / "superlink.log"
        )
        link_port, control = link_ports[0], f"127.0.0.1:{link_ports[0 if http else 1]}"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "{control}"\ninsecure = true\n'
        )
        for i in range(3):
            node_config = (
                f"data-path='{data}' node-id='node{i}' adapter-dir='{tmp_path / f'adapters{i}'}' "
                "threads=1"
            )

            def node_args(ports: list[int], node_config=node_config) -> list:
                api = (
                    ["--port", str(ports[0])]
                    if http
                    else ["--clientappio-api-address", f"127.0.0.1:{ports[0]}"]
                )
                return [
                    BIN / "flower-supernode", "--insecure", "--superlink",
                    f"127.0.0.1:{link_port}", "--node-config", node_config, *api,
                ]  # fmt: skip

            log = tmp_path / f"supernode{i}.log"
            proc, _ = _start_listening(start, node_args, 1, log)
            node_procs.append((proc, log.with_name(f"{log.stem}-0{log.suffix}")))
        run_config = (
            f"model='tiny' strategy='fedavg' num-server-rounds=1 max-steps=20 batch-size=4 "
            f"fraction-evaluate=0.0 local-eval=false min-nodes=3 secure-aggregation=true "
            f"out-dir='{out}' eval-data='{data}' round-timeout=60.0"
        )
        run = subprocess.Popen(
            [BIN / "flwr", "run", str(ROOT), "loopback", "--run-config", run_config, "--stream"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        killed = False
        if kill:
            victim, _ = node_procs[2]
            deadline = time.monotonic() + 240
            while not killed and time.monotonic() < deadline and run.poll() is None:
                logs = [p.read_text(errors="replace") for p in tmp_path.glob("supernode2*.log")]
                if any("training, then masking" in text for text in logs):
                    os.killpg(victim.pid, signal.SIGKILL)
                    killed = True
                else:
                    time.sleep(0.1)
            assert killed, "node2 never reached the masked-vector stage"
        stdout, _ = run.communicate(timeout=420)
        assert run.returncode == 0, stdout[-3000:]
        deadline = time.monotonic() + 120
        while "final" not in (
            json.loads(history_path.read_text()) if history_path.exists() else {}
        ):
            assert time.monotonic() < deadline, stdout[-3000:]
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
    secagg = round1["secagg"]
    assert secagg["completed"] and secagg["exposed_arrays"] == 0
    assert round1["secure"] is True
    create_model("tiny", adapter=out / "final")
    final = read_manifest(out / "final").adapter_fingerprint
    if not kill:
        assert secagg["survivors"] == 3 and sorted(round1["accepted"]) == [
            "node0", "node1", "node2"
        ]  # fmt: skip
        assert sorted(history["handover"]) == ["node0", "node1", "node2"]
    else:
        # node2 died after sharing its keys: either its masked vector never arrived (the
        # others' masks on it were removed with the shares of its neighbours), or it did
        # and its own mask was removed without it; the sum was unmasked either way
        assert secagg["survivors"] + secagg["dropped"] == 3 and secagg["survivors"] >= 2
        assert "node2" not in {k for k, v in history["handover"].items() if "error" not in v}
    for i in range(3 if not kill else 2):
        assert read_manifest(tmp_path / f"adapters{i}" / "federated").adapter_fingerprint == final
