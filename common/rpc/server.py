"""Server set-up every daemon repeats: the standard services and binding the address.

`add_health_and_reflection` registers grpc.health.v1 (reporting SERVING for "" and for
each named service) and server reflection for those services; whether a token is needed
to call them is the interceptor's business (common/rpc/auth.py). `bind` adds the listen
port, plaintext or TLS, and turns a failure into a ConfigError naming the address.
"""

from __future__ import annotations

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
