"""Server set-up every daemon repeats: the standard services and binding the address.

`add_health_and_reflection` registers grpc.health.v1 (reporting SERVING for "" and for
each named service) and server reflection for those services; whether a token is needed
to call them is the interceptor's business (common/rpc/auth.py). `bind` adds the listen
port, plaintext or TLS, and turns a failure into a ConfigError naming the address.
`wait_for_stop_signal` is how a daemon's main thread waits for SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import ConfigError


def add_health_and_reflection(
    server: grpc.Server, service_names: Sequence[str]
) -> health.HealthServicer:
    """Serve health and reflection for `service_names` (full names) on `server`; the
    returned servicer lets the caller change a status later."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *service_names):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return servicer


def bind(
    server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Add `address` (host:port; port 0 picks one) and return the bound port.

    Plaintext without `credentials`. Older grpcio returns 0 on failure, newer raises
    RuntimeError; both become a ConfigError naming the key and the address.
    """
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise ConfigError(f"listen: cannot bind {address} ({err}): in use or not local?") from err
    if not port:
        raise ConfigError(f"listen: cannot bind {address}: in use or not local?")
    return port


def wait_for_stop_signal() -> str:
    """Block until SIGTERM or SIGINT; return its name.

    The main thread polls instead of waiting forever: the kernel may deliver the signal to
    any thread (gRPC's, faiss's), and Python runs its handler only when the main thread next
    runs bytecode, so a main thread blocked in a plain `Event.wait()` can miss a SIGTERM
    for good (a node daemon was SIGKILLed after 15 s that way)."""
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, _frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    while not stop.wait(timeout=0.2):
        pass
    return received[0]
