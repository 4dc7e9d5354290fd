"""The client side every command shares: the caller's token and a (TLS) channel.

`fedretrieve query`, `fedretrieve ingest` and the console are gRPC clients of a broker or a
node; the broker is a client of its nodes. They read a bearer token the same way and open
plaintext, TLS or mTLS channels the same way, here, so a fix to either lands everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from common.errors import ConfigError


def read_token(token: str | None, token_file: str | None, env_var: str) -> str | None:
    """The token from `token_file` (preferred: not in the process list), else `token`,
    else the environment variable `env_var`; None when none is given."""
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as err:
            raise ConfigError(f"--token-file {token_file}: {err.strerror}") from err
    return token or os.environ.get(env_var) or None


def open_channel(
    address: str,
    *,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    server_name: str | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """Plaintext without `ca`/`cert`; TLS verifying the server against `ca`; mTLS when
    `cert` + `key` are given. `server_name` overrides the name checked in its certificate."""
    if ":" not in address:
        raise ConfigError(f"address must be host:port, got {address!r}")
    if (cert is None) != (key is None):
        raise ConfigError("the TLS client certificate and key go together (--tls-cert, --tls-key)")
    options = list(options)
    if ca is None and cert is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(cert))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, credentials, options=options)


def _read(path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from err
