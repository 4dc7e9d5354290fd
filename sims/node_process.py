"""Node daemons as child processes: the one way the simulation and the benchmarks start them.

A node is started exactly as an operator starts one (`fedretrieve node serve --config
FILE`), listening on `127.0.0.1:0`: the daemon binds a free port itself and announces it
on stdout (`READY host:port`), so no port is picked by one process and bound by another
(which a second test or benchmark on the machine can take in between). Its log goes to a
file; a node that exits before it is ready fails with the end of that log.

`run_json_child` is the other half: a measurement child (`python -m MODULE ARGS`) that
prints one JSON line as its result, for benchmarks that must measure a process of its own;
`start_json_child` starts one that prints a JSON line when ready and then answers
one-line requests on stdin with JSON lines (the fleet benchmark's hosts of many sites).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.errors import Unavailable
from protos import node_pb2, node_pb2_grpc

READY_PREFIX = "READY "


def child_env(omp_threads: int | None = 1) -> dict[str, str]:
    """The environment of a child: unbuffered, offline unless the caller decided otherwise,
    and (for daemons that share two cores) one OpenMP thread."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    return env


def node_toml(
    node_id: str,
    *,
    model: str,
    data_dir: str = "data",
    adapter_dir: str = "",
    token_file: str = "",
    sections: Mapping[str, Mapping[str, object]] | None = None,
    **keys: object,
) -> str:
    """A node TOML file listening on a port the daemon picks (see the module docstring).
    `keys` are top-level keys in snake_case; `sections` are tables such as index/limits."""
    top = {
        "node-id": node_id,
        "data-dir": data_dir,
        "listen": "127.0.0.1:0",
        "model": model,
        "adapter-dir": adapter_dir,
        **{k.replace("_", "-"): v for k, v in keys.items()},
    }
    tables = {k: dict(v) for k, v in (sections or {}).items()}
    if token_file:
        tables.setdefault("auth", {})["token-file"] = token_file
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k.replace('_', '-')} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


@dataclass
class NodeProcess:
    """A running `fedretrieve node serve` child and a channel to it."""

    node_id: str
    address: str
    token: str
    config_path: Path
    adapter_dir: Path | None  # the watched adapter dir (hot swap), if any
    log_path: Path
    proc: subprocess.Popen
    channel: grpc.Channel = field(init=False)
    stub: node_pb2_grpc.NodeServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.address)
        self.stub = node_pb2_grpc.NodeServiceStub(self.channel)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def status(self, timeout: float = 5.0) -> node_pb2.StatusResponse:
        return self.stub.Status(node_pb2.StatusRequest(), timeout=timeout, metadata=self.metadata)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (the daemon's graceful shutdown), then SIGKILL after `timeout_s`."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass(frozen=True)
class NodeFiles:
    """What `write_node_config` wrote for one node."""

    node_id: str
    config_path: Path
    token: str  # "" when the node runs without a token (loopback benchmarks)
    adapter_dir: Path | None


def write_node_config(
    root: Path,
    node_id: str,
    *,
    model: str,
    with_token: bool = True,
    sections: Mapping[str, Mapping[str, object]] | None = None,
    **keys: object,
) -> NodeFiles:
    """Write `root/node.toml` (data under `root/data`, adapters watched in `root/adapters`
    unless `adapter_dir=""`, a fresh bearer token in `root/token` unless `with_token` is
    false)."""
    root.mkdir(parents=True, exist_ok=True)
    token = ""
    if with_token:
        token = secrets.token_hex(16)
        (root / "token").write_text(token)
    keys.setdefault("adapter_dir", "adapters")
    adapter_dir = root / str(keys["adapter_dir"]) if keys["adapter_dir"] else None
    if adapter_dir is not None:
        adapter_dir.mkdir(parents=True, exist_ok=True)
    config = root / "node.toml"
    config.write_text(
        node_toml(
            node_id, model=model, token_file="token" if token else "", sections=sections, **keys
        )
    )
    return NodeFiles(node_id, config, token, adapter_dir)


def start_node_processes(
    nodes: Sequence[NodeFiles], *, ready_timeout_s: float = 120.0, omp_threads: int | None = 1
) -> list[NodeProcess]:
    """Start `fedretrieve node serve` for each written config, all at once (model loading
    overlaps), and return once every one serves; if one fails, all are stopped."""
    started: list[tuple[NodeFiles, subprocess.Popen, Path]] = []
    try:
        for files in nodes:
            log_path = files.config_path.parent / "node.log"
            with log_path.open("w") as log_file:
                cmd = [sys.executable, "-m", "sims.cli", "node", "serve"]
                proc = subprocess.Popen(
                    [*cmd, "--config", str(files.config_path)],
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    text=True,
                    env=child_env(omp_threads),
                )
            started.append((files, proc, log_path))
        deadline = time.monotonic() + ready_timeout_s
        ready = []
        for files, proc, log_path in started:
            left = max(deadline - time.monotonic(), 0.1)
            address = _wait_ready(proc, left, files.node_id, log_path)
            ready.append(
                NodeProcess(
                    files.node_id,
                    address,
                    files.token,
                    files.config_path,
                    files.adapter_dir,
                    log_path,
                    proc,
                )
            )
        return ready
    except BaseException:
        for _, proc, _ in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        raise


def _wait_ready(proc: subprocess.Popen, timeout_s: float, node_id: str, log_path: Path) -> str:
    """The address from the daemon's READY line, read with a deadline."""
    deadline = time.monotonic() + timeout_s
    eof = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(timeout=min(left, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:  # stdout closed: the daemon is exiting
                eof = True
                break
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip()
    if eof:  # stdout closes a moment before the process can be reaped
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    proc.poll()
    state = f"exited ({proc.returncode})" if proc.returncode is not None else "not ready"
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise Unavailable(
        f"node {node_id} {state} after {timeout_s:.0f} s at most; its log ends:\n{tail}"
    )


def wait_until(
    what: str, check: Callable[[], bool], timeout_s: float, nodes: Sequence[NodeProcess]
) -> None:
    """Poll `check` until it holds; fail early, with its log, if a node process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in nodes:
            if node.proc.poll() is not None:
                raise Unavailable(
                    f"node {node.node_id} exited ({node.proc.returncode}) while "
                    f"waiting for {what}; its log ends:\n{node.log_tail()}"
                )
        try:
            if check():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.25)
    raise Unavailable(f"timed out after {timeout_s:.0f} s waiting for {what}")


def run_json_child(
    module: str, args: Sequence[str], *, timeout_s: float, omp_threads: int | None = None
) -> dict:
    """Run `python -m module args` to completion; its last stdout line is its JSON result."""
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=child_env(omp_threads),
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise Unavailable(f"{' '.join(cmd)} did not finish in {timeout_s:.0f} s") from err
    if proc.returncode != 0 or not proc.stdout.strip():
        raise Unavailable(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class JsonChild:
    """A long-running child that speaks one JSON line per request over stdin/stdout."""

    proc: subprocess.Popen
    ready: dict

    def ask(self, line: str, timeout_s: float = 60.0) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(_read_line(self.proc, timeout_s, "an answer"))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Close its stdin (it exits), then kill it after `timeout_s`."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_json_child(
    module: str, args: Sequence[str], *, ready_timeout_s: float, omp_threads: int | None = 1
) -> JsonChild:
    """Start `python -m module args` and return once it printed its ready JSON line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(omp_threads),
    )
    try:
        return JsonChild(proc, json.loads(_read_line(proc, ready_timeout_s, "its ready line")))
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _read_line(proc: subprocess.Popen, timeout_s: float, what: str) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if sel.select(timeout=timeout_s):
            line = proc.stdout.readline()
            if line:
                return line
    raise Unavailable(f"{' '.join(map(str, proc.args))[:200]}: no {what} in {timeout_s:.0f} s")
