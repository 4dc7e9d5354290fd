"""The broker's configuration: one frozen object, loaded from one TOML file, checked up front.

TOML keys are kebab-case (Flower's convention), attributes snake_case; reading, the
conversion, type checks and the rejection of unknown keys are `common.config`'s, shared
by every process. Every field is documented in `server/broker/broker.example.toml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import from_dict, kebab, load_toml, resolve_path, resolve_paths
from common.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for one side of a TLS connection. Relative paths are resolved by the loader.

    Server side (the broker's listener): `cert` + `key`, and `ca` to require client
    certificates signed by it (mTLS). Client side (broker -> node): `ca` to verify the
    node, `cert` + `key` to present a client certificate, `server-name` to override the
    name checked against the node's certificate.
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("tls: `cert` and `key` must be given together")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"tls: `{name}` file {path} does not exist")

    def read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        return Path(path).read_bytes() if path is not None else None


@dataclass(frozen=True)
class NodeEntry:
    """One edge node the broker fans out to."""

    id: str
    address: str  # host:port
    token: str | None = None  # bearer token the node expects, sent on every call
    tls: TlsFiles | None = None  # None: plaintext (loopback, lab networks)

    def __post_init__(self) -> None:
        if not self.id or not self.id.strip():
            raise ConfigError("nodes: every node needs a non-empty `id`")
        if ":" not in self.address:
            raise ConfigError(f"nodes.{self.id}: `address` must be host:port, got {self.address!r}")


@dataclass(frozen=True)
class TailSettings:
    """`[tail]`: keeping the slowest nodes from setting every query's latency at scale.

    `adaptive-min-coverage` (share of the nodes asked, 0 = off): once it has answered, wait
    at most `adaptive-wait-factor` x the time taken so far (capped at
    `adaptive-max-extra-ms`) for the rest, then answer with the others named in coverage
    (`degraded: adaptive_timeout`). `topk-probability` (0 = off): ask each node for fewer
    than k hits, chosen so the merged top-k is exact with this probability if the true
    top-k is spread over nodes by gallery size (server/broker/topk.py says when not to)."""

    adaptive_min_coverage: float = 0.0
    adaptive_wait_factor: float = 0.5
    adaptive_max_extra_ms: int = 50
    topk_probability: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.adaptive_min_coverage <= 1.0:
            raise ConfigError(
                f"tail: `adaptive-min-coverage` must be in [0, 1], got {self.adaptive_min_coverage}"
            )
        if self.adaptive_wait_factor < 0:
            raise ConfigError(
                f"tail: `adaptive-wait-factor` must be >= 0, got {self.adaptive_wait_factor}"
            )
        if self.adaptive_max_extra_ms < 0:
            raise ConfigError(
                f"tail: `adaptive-max-extra-ms` must be >= 0, got {self.adaptive_max_extra_ms}"
            )
        if not 0.0 <= self.topk_probability < 1.0:
            raise ConfigError(
                f"tail: `topk-probability` must be in [0, 1), got {self.topk_probability}"
            )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def calibration_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively), sorted: the calibration crops."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


@dataclass(frozen=True)
class StudentSettings:
    """`[students]`: when a distilled student node's scores may be merged with the broker's
    model's by score (server/broker/students.py says how it is checked).

    `calibration-crops`: a folder of person crops the operator provides (relative to the
    config file). A node whose Status says it is a student of the broker's model gets them
    through `EmbedImage(image=...)` once per (node, its model version, the broker's model
    version), at health-check time, and the broker embeds them too. `min-agreement`: the
    mean cosine between the two at or above which the student counts as verified and its
    answers are merged by score. Unset crops: no student is verified (rank fusion, as for
    any other version). `probe-timeout-s`: the limit of each probe call."""

    calibration_crops: Path | None = None
    min_agreement: float = 0.9
    probe_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 < self.min_agreement <= 1.0:
            raise ConfigError(
                f"students: `min-agreement` must be a mean cosine in (0, 1], got "
                f"{self.min_agreement}"
            )
        if self.probe_timeout_s <= 0:
            raise ConfigError(
                f"students: `probe-timeout-s` must be positive, got {self.probe_timeout_s}"
            )
        folder = self.calibration_crops
        if folder is None:
            return
        if not Path(folder).is_dir():
            raise ConfigError(
                f"students: `calibration-crops` {folder} is not a folder (of person crops)"
            )
        if not calibration_files(Path(folder)):
            raise ConfigError(
                f"students: `calibration-crops` {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images"
            )


@dataclass(frozen=True)
class BrokerConfig:
    """Everything `fedretrieve broker serve` needs; validated before a port is bound."""

    nodes: tuple[NodeEntry, ...]
    listen: str = "127.0.0.1:50070"
    metrics_port: int | None = None  # Prometheus /metrics on its own port; 0: any free port
    model: str | None = None  # spec for common.factory.create_model; None: nodes encode text
    adapter: str | None = None  # global adapter (or folder of adapters; newest wins)
    adapter_poll_s: float = 10.0  # how often `adapter` is checked for a new one; 0: never
    operator_tokens: tuple[str, ...] = ()  # bearer tokens operators present
    allow_unauthenticated: bool = False  # must be set explicitly to run without tokens
    tls: TlsFiles | None = None  # listener TLS; `tls.ca` makes it mTLS
    default_k: int = 20
    max_k: int = 100  # keep <= the nodes' [limits] max-k, or large k fail there
    max_text_chars: int = 512  # keep <= the nodes' [limits] max-query-chars
    max_node_ids: int = 256  # node ids in one Search's `node_ids`
    max_camera_ids: int = 256  # camera ids in one Search filter; keep <= nodes' max-camera-ids
    max_id_chars: int = 64  # length of each node or camera id in a request
    default_deadline_ms: int = 2000
    max_deadline_ms: int = 30000
    merge_margin_ms: int = 20  # kept back from every node call for merging and replying
    health_interval_s: float = 5.0
    health_timeout_s: float = 1.0
    keepalive_time_ms: int = 10000
    keepalive_timeout_ms: int = 5000
    retry_max_attempts: int = 3  # retries happen on UNAVAILABLE only, inside the deadline
    workers: int = 16  # threads serving operator calls
    tail: TailSettings = TailSettings()  # adaptive wait and fewer hits per node (off)
    students: StudentSettings = StudentSettings()  # no crops: no student is score-merged

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("`nodes` is empty: the broker needs at least one [[nodes]] entry")
        ids = [node.id for node in self.nodes]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"nodes: duplicate node id(s) {duplicates}")
        if ":" not in self.listen:
            raise ConfigError(f"`listen` must be host:port, got {self.listen!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"`metrics-port` must be 0..65535, got {self.metrics_port}")
        if self.adapter is not None and self.model is None:
            raise ConfigError("`adapter` is set but `model` is not: an adapter needs its base")
        if not self.operator_tokens and not self.allow_unauthenticated:
            raise ConfigError(
                "no `operator-tokens`: give at least one, or set "
                "`allow-unauthenticated = true` to run an open broker (loopback/tests only)"
            )
        if any(not token for token in self.operator_tokens):
            raise ConfigError("`operator-tokens` holds an empty token")
        positive = (
            "default_k",
            "max_k",
            "max_text_chars",
            "max_node_ids",
            "max_camera_ids",
            "max_id_chars",
            "default_deadline_ms",
            "max_deadline_ms",
            "health_interval_s",
            "health_timeout_s",
            "keepalive_time_ms",
            "keepalive_timeout_ms",
            "retry_max_attempts",
            "workers",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"`{kebab(name)}` must be positive, got {getattr(self, name)}")
        if self.adapter_poll_s < 0:
            raise ConfigError(f"`adapter-poll-s` must be >= 0, got {self.adapter_poll_s}")
        if self.merge_margin_ms < 0:
            raise ConfigError(f"`merge-margin-ms` must be >= 0, got {self.merge_margin_ms}")
        if self.default_k > self.max_k:
            raise ConfigError(f"`default-k` ({self.default_k}) exceeds `max-k` ({self.max_k})")
        if self.default_deadline_ms > self.max_deadline_ms:
            raise ConfigError(
                f"`default-deadline-ms` ({self.default_deadline_ms}) exceeds "
                f"`max-deadline-ms` ({self.max_deadline_ms})"
            )
        if self.merge_margin_ms >= self.default_deadline_ms:
            raise ConfigError(
                f"`merge-margin-ms` ({self.merge_margin_ms}) leaves no time for nodes within "
                f"`default-deadline-ms` ({self.default_deadline_ms})"
            )
        if self.tls is not None and self.tls.cert is None:
            raise ConfigError("[tls] for the listener needs `cert` and `key`")
        if self.retry_max_attempts > 5:
            raise ConfigError("`retry-max-attempts` above 5 is refused by gRPC; use 1..5")

    def node(self, node_id: str) -> NodeEntry:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)


def _read_secret(path: str, where: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read {path}: {err}") from err


def _resolve_tls(table: Any, base: Path, where: str) -> Any:
    if isinstance(table, dict):
        resolve_paths(table, ("cert", "key", "ca"), base, where)
    return table


def _prepare_node(table: Any, base: Path, index: int) -> Any:
    """Resolve a node's relative paths and read its `token-file`."""
    where = f"nodes[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table ([[nodes]])")
    unknown = sorted(set(table) - {"id", "address", "token", "token_file", "tls"})
    if unknown:
        names = ", ".join(kebab(k) for k in unknown)
        raise ConfigError(
            f"{where}: unknown key(s) {names}; allowed: id, address, token, token-file, tls"
        )
    path = resolve_path(table.pop("token_file", ""), base, f"{where}.token-file")
    if path is not None:
        if "token" in table:
            raise ConfigError(f"{where}: give `token` or `token-file`, not both")
        table["token"] = _read_secret(path, f"{where}.token-file")
    if "tls" in table:
        table["tls"] = _resolve_tls(table["tls"], base, f"{where}.tls")
    return table


def broker_config_from_dict(data: dict[str, Any], base_dir: Path | str = ".") -> BrokerConfig:
    """Build a config from parsed TOML (snake_case keys); relative paths from `base_dir`,
    and a path set to "" is not set (`common.config.resolve_path`)."""
    base = Path(base_dir)
    data = dict(data)
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ConfigError("broker config: needs one or more [[nodes]] tables")
    data["nodes"] = [
        _prepare_node(dict(t) if isinstance(t, dict) else t, base, i) for i, t in enumerate(nodes)
    ]
    path = resolve_path(data.pop("operator_tokens_file", ""), base, "operator-tokens-file")
    if path is not None:
        extra = [t.strip() for t in _read_secret(path, "operator-tokens-file").splitlines()]
        data["operator_tokens"] = [*data.get("operator_tokens", []), *(t for t in extra if t)]
    if "tls" in data:
        data["tls"] = _resolve_tls(dict(data["tls"]), base, "tls")
    resolve_paths(data, ("adapter",), base, "")
    if isinstance(data.get("students"), dict):
        data["students"] = dict(data["students"])
        resolve_paths(data["students"], ("calibration_crops",), base, "students")
    return from_dict(BrokerConfig, data, "broker config")


def load_broker_config(path: Path | str) -> BrokerConfig:
    """Read and validate a broker TOML file; every problem is a ConfigError naming it."""
    path = Path(path)
    data = load_toml(path)
    try:
        return broker_config_from_dict(data, base_dir=path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
