"""The node daemon's configuration: one frozen dataclass tree loaded from one TOML file.

Why its own module: the daemon must refuse a bad file *before* it binds a port or touches
the gallery, with a message naming the key (`[limits] max-k: must be >= 1, got 0`). TOML
keys are kebab-case (Flower's convention), attributes snake_case; the project's one loader
(`common.config`) converts them and rejects unknown keys by name, so a typo never turns
into a silently ignored setting. This module adds the node's checks and resolves relative
paths against the config file's folder. Every field is documented in `edge_node/node.example.toml`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import from_dict, kebab, load_toml, resolve_paths, snake_keys
from common.errors import ConfigError
from edge_node.accel.registry import BACKENDS

INDEX_TYPES = ("flat", "hnsw", "ivf")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _require(cond: bool, name: str, message: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{name}: {message}, got {value!r}")


@dataclass(frozen=True)
class IndexSettings:
    """How the gallery vectors are indexed (`[index]`)."""

    type: str = "flat"  # flat: exact; hnsw/ivf: approximate, for galleries of ~100k and up
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_search: int = 64  # HNSW search breadth (recall vs latency)
    ivf_nlist: int = 256  # IVF cells; trained once enough vectors exist
    ivf_nprobe: int = 16  # IVF cells visited per query
    embed_batch_size: int = 32  # images per forward pass in the background embedder
    save_interval_s: float = 30.0  # persist the index at most this often (and at shutdown)

    def __post_init__(self) -> None:
        _require(
            self.type in INDEX_TYPES, "[index] type", f"must be one of {INDEX_TYPES}", self.type
        )
        for name in ("hnsw_m", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe", "embed_batch_size"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 1,
                f"[index] {kebab(name)}",
                "must be an integer >= 1",
                value,
            )
        _require(
            self.save_interval_s >= 0,
            "[index] save-interval-s",
            "must be >= 0",
            self.save_interval_s,
        )


@dataclass(frozen=True)
class CameraNormSettings:
    """Per-camera colour and levels normalisation of crops before embedding (`[camera-norm]`).

    Label-free and computed on the node from its own gallery (`common.camera_norm`): each
    camera's channel gains undo its light's colour cast, its levels its exposure. It is also
    the trivial baseline the federated model must beat (docs/benchmark.md).
    """

    enabled: bool = False  # off: crops are embedded as they are (no statistics kept)
    levels: bool = True  # also stretch each camera's black and white point (not only gains)
    min_images: int = 20  # a camera's gains are used once it has this many crops
    refit_change: float = 0.05  # re-embed the gallery when a gain drifts by more than this

    def __post_init__(self) -> None:
        _require(
            isinstance(self.enabled, bool),
            "[camera-norm] enabled",
            "must be true or false",
            self.enabled,
        )
        _require(
            isinstance(self.levels, bool), "[camera-norm] levels", "must be true or false",
            self.levels,
        )  # fmt: skip
        _require(
            isinstance(self.min_images, int)
            and not isinstance(self.min_images, bool)
            and self.min_images >= 1,
            "[camera-norm] min-images",
            "must be an integer >= 1",
            self.min_images,
        )
        _require(
            isinstance(self.refit_change, (int, float))
            and not isinstance(self.refit_change, bool)
            and 0 < self.refit_change < 1,
            "[camera-norm] refit-change",
            "must be a relative gain change between 0 and 1 (exclusive)",
            self.refit_change,
        )


@dataclass(frozen=True)
class AuthSettings:
    """Who may call the node (`[auth]`).

    Credentials are a token (`token`/`token-file`) or mTLS (`tls-client-ca`); TLS alone
    encrypts but lets anyone call. Without credentials the node is open: allowed on a
    loopback `listen` address (with a WARNING at start), and on any other address only
    with an explicit `allow-unauthenticated = true` (`NodeConfig` checks it).
    """

    token: str = ""  # bearer token expected in `authorization: Bearer <token>`
    token_file: str = ""  # or read it from this file (preferred: keeps it out of the config)
    tls_cert: str = ""  # server certificate (PEM); with tls_key enables TLS
    tls_key: str = ""
    tls_client_ca: str = ""  # CA bundle; when set, clients must present a certificate (mTLS)
    allow_unauthenticated: bool = False  # must be set to listen beyond loopback without credentials

    def __post_init__(self) -> None:
        _require(
            isinstance(self.allow_unauthenticated, bool),
            "[auth] allow-unauthenticated",
            "must be true or false",
            self.allow_unauthenticated,
        )
        _require(
            not (self.token and self.token_file), "[auth] token/token-file", "set only one", "both"
        )
        _require(
            bool(self.tls_cert) == bool(self.tls_key),
            "[auth] tls-cert/tls-key",
            "set both or neither",
            (self.tls_cert, self.tls_key),
        )
        _require(
            not self.tls_client_ca or bool(self.tls_cert),
            "[auth] tls-client-ca",
            "needs tls-cert and tls-key",
            self.tls_client_ca,
        )
        for name in ("token_file", "tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            _require(
                not value or Path(value).is_file(),
                f"[auth] {kebab(name)}",
                "file does not exist",
                value,
            )

    def resolved_token(self) -> str:
        """The token in force: inline, or the first line of `token_file`."""
        if self.token_file:
            token = Path(self.token_file).read_text(encoding="utf-8").strip()
            _require(bool(token), "[auth] token-file", "file is empty", self.token_file)
            return token
        return self.token

    @property
    def has_credentials(self) -> bool:
        """A caller must prove who it is: a token, or a client certificate (mTLS)."""
        return bool(self.token or self.token_file or self.tls_client_ca)


FILE_NAME_CHARSETS = ("printable", "portable")


@dataclass(frozen=True)
class Limits:
    """Bounds on what a caller may ask for (`[limits]`); requests beyond them are refused."""

    max_k: int = 100
    max_query_chars: int = 512
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 16_000_000  # width * height; guards against decompression bombs
    max_ingest_batch: int = 256  # images per Ingest call
    thumbnail_max_side: int = 256  # default and upper bound of GetThumbnail's max_side
    grpc_workers: int = 8  # concurrent RPCs
    max_message_mb: int = 64  # gRPC receive limit (Ingest carries images)
    max_file_name_chars: int = 255  # ImageItem.file_name (a file system's usual limit)
    file_name_charset: str = "printable"  # or "portable": only [A-Za-z0-9._-]
    max_captions: int = 16  # captions per image
    max_caption_chars: int = 1024
    max_camera_id_chars: int = 64  # ImageItem.camera_id and each Search camera filter
    max_camera_ids: int = 256  # camera ids in one Search filter

    def __post_init__(self) -> None:
        _require(
            self.file_name_charset in FILE_NAME_CHARSETS,
            "[limits] file-name-charset",
            f"must be one of {FILE_NAME_CHARSETS}",
            self.file_name_charset,
        )
        for f in dataclasses.fields(self):
            if f.type in (str, "str"):
                continue
            value = getattr(self, f.name)
            _require(
                isinstance(value, int) and value >= 1,
                f"[limits] {kebab(f.name)}",
                "must be an integer >= 1",
                value,
            )


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node daemon needs; see `edge_node/node.example.toml` for each key."""

    node_id: str
    data_dir: Path
    listen: str = "127.0.0.1:50051"
    model: str = "default"  # config name, model directory, or "hf:<id>" (common.factory)
    adapter_dir: Path | None = None  # watched for new adapters (hot swap); None: base model only
    adapter_poll_s: float = 5.0
    backend: str = "torch"
    device: str = "cpu"
    text_tower: bool = True  # false: vector-only node; no text tower loaded, text refused
    torch_threads: int = 0  # 0: leave torch's default
    faiss_threads: int = 1  # OpenMP threads per faiss search (1 suits one query per call)
    drop_dir: Path | None = None  # folder a detector pipeline writes crops into
    drop_poll_s: float = 2.0
    drop_settle_s: float = 1.0  # a dropped file must be this old before it is read
    metrics_listen: str = ""  # "host:port" for Prometheus /metrics; "" disables
    grace_s: float = 10.0  # SIGTERM: time in-flight calls get to finish
    log_format: str = "text"  # "text" (key=value) or "json" (one object a line)
    index: IndexSettings = field(default_factory=IndexSettings)
    camera_norm: CameraNormSettings = field(default_factory=CameraNormSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        for name in ("data_dir", "adapter_dir", "drop_dir"):  # accept str from Python callers
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value) if value else None)
        _require(self.data_dir is not None, "data-dir", "must be set", self.data_dir)
        _require(
            isinstance(self.node_id, str) and bool(_NODE_ID.match(self.node_id)),
            "node-id",
            "must be 1-64 of [A-Za-z0-9_.-]",
            self.node_id,
        )
        _require(_is_host_port(self.listen), "listen", "must be host:port", self.listen)
        if not self.auth.has_credentials and not self.auth.allow_unauthenticated:
            _require(
                is_loopback(self.listen),
                "listen / [auth]",
                "a node listening beyond loopback needs credentials: set [auth] token-file "
                "(or token), or tls-client-ca for mTLS; or set [auth] allow-unauthenticated "
                "= true to serve raw images to anyone who can reach it",
                self.listen,
            )
        _require(
            not self.metrics_listen or _is_host_port(self.metrics_listen),
            "metrics-listen",
            "must be host:port or empty",
            self.metrics_listen,
        )
        _require(bool(str(self.model).strip()), "model", "must not be empty", self.model)
        _require(
            self.log_format in ("text", "json"),
            "log-format",
            "must be text or json",
            self.log_format,
        )
        _require(
            isinstance(self.text_tower, bool),
            "text-tower",
            "must be true or false",
            self.text_tower,
        )
        backends = tuple(BACKENDS)
        _require(self.backend in backends, "backend", f"must be one of {backends}", self.backend)
        _require(self.torch_threads >= 0, "torch-threads", "must be >= 0", self.torch_threads)
        _require(self.faiss_threads >= 0, "faiss-threads", "must be >= 0", self.faiss_threads)
        for name in ("adapter_poll_s", "drop_poll_s"):
            _require(getattr(self, name) > 0, kebab(name), "must be > 0", getattr(self, name))
        for name in ("drop_settle_s", "grace_s"):
            _require(getattr(self, name) >= 0, kebab(name), "must be >= 0", getattr(self, name))
        if self.adapter_dir is not None and self.adapter_dir.exists():
            _require(
                self.adapter_dir.is_dir(),
                "adapter-dir",
                "must be a directory",
                str(self.adapter_dir),
            )


def is_loopback(listen: str) -> bool:
    """Whether a host:port listen address accepts connections from this machine only."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) < 65536)


_PATHS = ("data_dir", "adapter_dir", "drop_dir")
_AUTH_FILES = ("token_file", "tls_cert", "tls_key", "tls_client_ca")


def node_config_from_dict(table: dict[str, Any], base_dir: Path | str = ".") -> NodeConfig:
    """Build a NodeConfig from a parsed TOML table (kebab- or snake-case keys); relative
    paths resolve against `base_dir`, and an empty path means "not set" (the default)."""
    data = snake_keys(table)
    resolve_paths(data, _PATHS, base_dir, "")
    for required in ("node_id", "data_dir"):
        if required not in data:
            raise ConfigError(f"{kebab(required)}: required key is missing or empty")
    auth = data.get("auth")
    if isinstance(auth, dict):
        resolve_paths(auth, _AUTH_FILES, base_dir, "auth")
    return from_dict(NodeConfig, data, "node config")


def load_node_config(path: Path | str) -> NodeConfig:
    """Read and validate a node TOML file (relative paths are relative to the file)."""
    path = Path(path)
    return node_config_from_dict(load_toml(path), path.resolve().parent)
