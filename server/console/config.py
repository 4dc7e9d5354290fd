"""The console's configuration (`console.toml`): one frozen object, checked before a port is bound.

Keys are kebab-case like every other config in the project (`common.config`); relative paths
are resolved against the file's folder. Every key is documented in
`server/console/console.example.toml`.

Operators: each `[operators]` entry maps an operator's name to the file holding that
operator's bearer token for the broker. Signing in to the console with that token makes
the session that operator's, and every broker call of the session carries that token, so
the broker and the console's audit log name the same person.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import from_dict, load_toml, resolve_path, resolve_paths
from common.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_BYTES = 32
MIN_SECRET_CHARS = 32


@dataclass(frozen=True)
class BrokerTls:
    """`[broker-tls]`: how the console reaches a TLS broker (`ca` turns TLS on; `cert` +
    `key` present a client certificate for mTLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("broker-tls: `cert` and `key` go together")
        if self.cert is not None and self.ca is None:
            raise ConfigError("broker-tls: a client `cert` needs the broker's `ca` too")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"broker-tls: `{name}` file {path} does not exist")

    def as_tuple(self) -> tuple[str | None, str | None, str | None]:
        return (self.ca, self.cert, self.key)


@dataclass(frozen=True)
class ListenTls:
    """`[tls]`: serve the console over HTTPS (`cert` + `key`, PEM)."""

    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("tls: `cert` and `key` go together")
        for name in ("cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"tls: `{name}` file {path} does not exist")

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class ConsoleConfig:
    broker: str = "127.0.0.1:50070"
    listen: str = "127.0.0.1:8470"
    operators: dict[str, str] = field(default_factory=dict)  # name -> token file
    admins: tuple[str, ...] = ()  # operators who may read the audit log
    session_secret_file: str = "console-session.secret"  # created (0600) when missing
    audit_log: str = "console-audit.jsonl"
    session_ttl_s: int = 8 * 3600
    connect_timeout_s: float = 2.0  # waiting for the broker before saying it is down
    thumbnail_side: int = 160  # grid thumbnails; the detail view asks for the node's limit
    max_failed_sign_ins: int = 5  # per client address and minute; then refused for a minute
    allow_insecure_http: bool = False  # needed to listen beyond loopback without [tls]
    broker_tls: BrokerTls = BrokerTls()
    tls: ListenTls = ListenTls()

    def __post_init__(self) -> None:
        for name, value in (("broker", self.broker), ("listen", self.listen)):
            if ":" not in value:
                raise ConfigError(f"`{name}` must be host:port, got {value!r}")
        if not self.operators:
            raise ConfigError(
                "no [operators]: map each operator's name to the file holding their "
                'broker token (e.g. alice = "alice.token")'
            )
        unknown = sorted(set(self.admins) - set(self.operators))
        if unknown:
            raise ConfigError(f"`admins` names no operator: {', '.join(unknown)}")
        if self.session_ttl_s <= 0:
            raise ConfigError(f"`session-ttl-s` must be positive, got {self.session_ttl_s}")
        if self.connect_timeout_s <= 0:
            raise ConfigError("`connect-timeout-s` must be positive")
        if not 16 <= self.thumbnail_side <= 1024:
            raise ConfigError(f"`thumbnail-side` must be 16..1024, got {self.thumbnail_side}")
        if self.max_failed_sign_ins < 1:
            raise ConfigError("`max-failed-sign-ins` must be at least 1")
        if not self.tls.enabled and not self.allow_insecure_http and not _is_loopback(self.host):
            raise ConfigError(
                f"`listen` {self.listen} is not a loopback address and [tls] is not set: "
                "operators' tokens would cross the network in clear. Configure [tls] cert/key "
                "(or set allow-insecure-http = true behind a TLS-terminating proxy)"
            )

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        try:
            return int(self.listen.rsplit(":", 1)[1])
        except ValueError as err:
            raise ConfigError(f"`listen` port is not a number: {self.listen!r}") from err


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def console_config_from_dict(data: dict[str, Any], base_dir: Path | str = ".") -> ConsoleConfig:
    data = dict(data)
    for name, default in (
        ("session_secret_file", ConsoleConfig.session_secret_file),
        ("audit_log", ConsoleConfig.audit_log),
    ):
        if data.get(name) == "":
            raise ConfigError(f'`{name.replace("_", "-")}` cannot be empty ("")')
        data.setdefault(name, default)  # next to the config file, not in the working dir
    resolve_paths(data, ("session_secret_file", "audit_log"), base_dir, "")
    for section in ("broker_tls", "tls"):
        if section in data:
            if not isinstance(data[section], dict):
                raise ConfigError(f"[{section.replace('_', '-')}] must be a table")
            table = dict(data[section])
            resolve_paths(table, ("ca", "cert", "key"), base_dir, section.replace("_", "-"))
            data[section] = table
    operators = data.get("operators", {})
    if not isinstance(operators, dict):
        raise ConfigError('[operators] must be a table of name = "token file"')
    resolved = {}
    for name, path in operators.items():
        where = f"operators.{name}"
        if not str(name).strip():
            raise ConfigError("operators: an operator name is empty")
        target = resolve_path(path, base_dir, where)
        if target is None:
            raise ConfigError(f'{where}: the token file is empty ("")')
        resolved[str(name)] = target
    data["operators"] = resolved
    # operators are names, not kebab keys: keep them as written (snake_keys changed - to _)
    return from_dict(ConsoleConfig, data, "console config")


def load_console_config(path: Path | str) -> ConsoleConfig:
    path = Path(path)
    raw = _raw_operator_names(path)
    data = load_toml(path)
    if raw is not None and isinstance(data.get("operators"), dict):
        data["operators"] = raw
    try:
        return console_config_from_dict(data, base_dir=path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def _raw_operator_names(path: Path) -> dict[str, Any] | None:
    """The [operators] table with names exactly as written (load_toml snake-cases keys)."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh).get("operators")
    except (OSError, tomllib.TOMLDecodeError):
        return None  # load_toml reports it
    return table if isinstance(table, dict) else None


# ---------------------------------------------------------------- secrets read at start


@dataclass(frozen=True)
class Operator:
    name: str
    token: str
    admin: bool

    @property
    def fingerprint(self) -> str:
        """A short digest of the token, carried in the session so a rotated token (or an
        operator removed from the config) ends that operator's sessions."""
        return hashlib.sha256(b"fedretrieve-console:" + self.token.encode()).hexdigest()[:16]


def read_operators(config: ConsoleConfig) -> dict[str, Operator]:
    operators: dict[str, Operator] = {}
    seen: dict[str, str] = {}
    for name, path in config.operators.items():
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            raise ConfigError(f"operators.{name}: cannot read {path}: {err.strerror}") from err
        if not token:
            raise ConfigError(f"operators.{name}: token file {path} is empty")
        for other, other_token in seen.items():
            if hmac.compare_digest(token, other_token):
                raise ConfigError(
                    f"operators {other} and {name} share one token: each operator needs "
                    "their own, or the audit log cannot tell them apart"
                )
        seen[name] = token
        operators[name] = Operator(name, token, name in config.admins)
    return operators


def read_or_create_secret(path: str | Path) -> bytes:
    """The key that signs session cookies and CSRF tokens; made (0600) on first start.
    Replacing the file signs every operator out."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as err:
        raise ConfigError(f"session-secret-file {path}: cannot create it: {err.strerror}") from err
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(SECRET_BYTES) + "\n")
        log.info("created session secret %s", path)
    try:
        secret = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"session-secret-file {path}: cannot read it: {err.strerror}") from err
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"session-secret-file {path}: holds {len(secret)} characters; at least "
            f"{MIN_SECRET_CHARS} are needed (delete it and the console makes a new one)"
        )
    if path.stat().st_mode & 0o077:
        log.warning("session secret %s is readable by others: chmod 600 it", path)
    return secret.encode()
