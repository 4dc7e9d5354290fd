"""A real Flower deployment on loopback for tests: a SuperLink and SuperNodes as separate
processes, driven by `flwr run`, offline (no dependency installation).

`flower_deployment(tmp_path)` yields a `Deployment`: add SuperNodes with their own
`--node-config` (as a Jetson would get), start a run, wait for the server's history.
Everything it started is stopped when the block ends, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class Deployment:
    """A running SuperLink (and the SuperNodes added to it) under `root`."""

    root: Path
    env: dict[str, str]
    http: bool
    procs: list[subprocess.Popen] = field(default_factory=list)
    link_port: int = 0

    def start(self, args: list, log: Path) -> subprocess.Popen:
        with log.open("w") as fh:  # the child holds its own copy of the descriptor
            proc = subprocess.Popen(
                args, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        def link_args(ports: list[int]) -> list:
            if self.http:  # Flower >= 1.3x: Fleet and Control over one HTTP port
                api = ["--host", "127.0.0.1", "--port", str(ports[0])]
            else:  # Flower 1.30: gRPC Fleet / Control / ServerAppIo APIs
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

        _, ports = _start_listening(
            self.start, link_args, 1 if self.http else 3, self.root / "superlink.log"
        )
        self.link_port, control = ports[0], f"127.0.0.1:{ports[0 if self.http else 1]}"
        (Path(self.env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "{control}"\ninsecure = true\n'
        )

    def add_supernode(self, name: str, node_config: str) -> tuple[subprocess.Popen, Path]:
        """Start a SuperNode with `--node-config node_config`; -> (process, its log)."""

        def node_args(ports: list[int]) -> list:
            api = (
                ["--port", str(ports[0])]
                if self.http
                else ["--clientappio-api-address", f"127.0.0.1:{ports[0]}"]
            )
            return [
                BIN / "flower-supernode", "--insecure", "--superlink",
                f"127.0.0.1:{self.link_port}", "--node-config", node_config, *api,
            ]  # fmt: skip

        log = self.root / f"{name}.log"
        proc, _ = _start_listening(self.start, node_args, 1, log)
        return proc, log.with_name(f"{log.stem}-0{log.suffix}")

    def run(self, run_config: str) -> subprocess.Popen:
        """`flwr run` of this project on the SuperLink, output streamed into its pipe."""
        return subprocess.Popen(
            [BIN / "flwr", "run", str(ROOT), "loopback", "--run-config", run_config, "--stream"],
            env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    def finish(self, run: subprocess.Popen, out: Path, timeout_s: float = 420) -> dict:
        """Wait for `run` and then for the server's final history in `out` (--stream
        returns once the run is done, the ServerApp may still be writing)."""
        stdout, _ = run.communicate(timeout=timeout_s)
        assert run.returncode == 0, stdout[-3000:]
        history_path = out / "history.json"
        deadline = time.monotonic() + 120
        while "final" not in (
            json.loads(history_path.read_text()) if history_path.exists() else {}
        ):
            assert time.monotonic() < deadline, stdout[-3000:]
            time.sleep(1)
        return json.loads(history_path.read_text())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@contextlib.contextmanager
def flower_deployment(root: Path) -> Iterator[Deployment]:
    """A SuperLink on loopback under `root`, with its own FLWR_HOME; stopped at the end."""
    home = root / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec, flwr-*
        "HF_HUB_OFFLINE": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    deployment = Deployment(root, env, _http_api())
    try:
        deployment.start_superlink()
        yield deployment
    finally:
        deployment.stop()
