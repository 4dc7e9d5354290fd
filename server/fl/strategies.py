"""Aggregation of LoRA adapter updates: the math and the gate in front of it, no I/O.

Each strategy is one of Flower's own (FedAvg, FedTrimmedAvg, FedMedian) with
`ValidatedAggregation` in front: it overrides `aggregate_train` only to screen every reply
before Flower averages. A reply is aggregated only if it carries exactly the keys, shapes
and dtypes of the global payload the server sent, finite values, a positive `num-examples`,
and a change from the round's global adapter within the norm bound. Anything else is
dropped and logged with the node id; a failed or timed-out node is simply absent. The
round aggregates as long as `min_updates` valid updates remain.

Under secure aggregation (server/fl/privacy.py) no individual update reaches the server:
every train reply carries the same unmasked weighted average (marked with a `secagg`
ConfigRecord). The gate then checks that average instead (keys, shapes, dtypes, finite,
its change within the norm bound, which the mean of clipped changes always is) and takes it
as the aggregate; each node has bounded its own change by clipping before masking.

Label-free nodes that share tracklet memories (`share-memories`, common/memories.py) add
them to their replies as a second ArrayRecord; the gate takes it off before screening the
adapter, keeps each node's latest, and the next round's train message to each node that
shares carries the others' (a node that does not share receives none). Malformed memories
are dropped with the node named; the node's adapter update still counts.

FedIT (`fedavg`) averages A and B separately, which is inexact: mean(B)·mean(A) is not
mean(B·A). FFA-LoRA (`ffa`) freezes A at the same seeded init on every node and sends only
B, so the average of B times the shared A is exactly the average of the nodes' B·A.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common.errors import AdapterMismatch, ConfigError
from common.memories import (
    REPLY_RECORD,
    SHARED_RECORD,
    SharedMemories,
    from_record,
    pool,
    to_record,
)

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from server.fl.run_config import FlConfig

# A child of Flower's logger: these lines show wherever Flower's do (console, `flwr run
# --stream`, `flwr log`), also in the ServerApp/ClientApp subprocesses of the deployment engine.
log = logging.getLogger("flwr").getChild(__name__)

NUM_EXAMPLES = "num-examples"
NODE_RECORD = "node"  # ConfigRecord a node may add to its reply: {"node-name": "..."}
SECAGG_RECORD = "secagg"  # on replies that carry the SecAgg+ aggregate (server/fl/privacy.py)


@dataclass(frozen=True)
class UpdateSpec:
    """What a valid update looks like: exactly the keys, shapes and dtypes sent out."""

    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]

    @classmethod
    def from_arrays(cls, arrays: ArrayRecord) -> UpdateSpec:
        return cls(
            {k: tuple(a.shape) for k, a in arrays.items()},
            {k: str(a.dtype) for k, a in arrays.items()},
        )

    @property
    def nbytes(self) -> int:
        """Raw tensor bytes of one payload (what one node sends or receives per round)."""
        return sum(
            math.prod(shape) * np.dtype(self.dtypes[k]).itemsize for k, shape in self.shapes.items()
        )


def check_update(
    arrays: ArrayRecord,
    spec: UpdateSpec,
    reference: Mapping[str, np.ndarray] | None = None,
    *,
    max_norm: float | None = None,
) -> dict[str, np.ndarray]:
    """The update as numpy arrays, or AdapterMismatch saying what is wrong with it.

    `max_norm` bounds the L2 norm of the change from `reference` (the round's global).
    """
    missing = sorted(set(spec.shapes) - set(arrays))
    unexpected = sorted(set(arrays) - set(spec.shapes))
    if missing or unexpected:
        raise AdapterMismatch(
            f"keys differ from the global adapter (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    update = {}
    for key, array in arrays.items():
        value = array.numpy()
        if tuple(value.shape) != spec.shapes[key]:
            raise AdapterMismatch(
                f"{key} has shape {tuple(value.shape)}, expected {spec.shapes[key]}"
            )
        if str(value.dtype) != spec.dtypes[key]:
            raise AdapterMismatch(f"{key} has dtype {value.dtype}, expected {spec.dtypes[key]}")
        if not np.isfinite(value).all():
            raise AdapterMismatch(f"{key} contains NaN or inf")
        update[key] = value
    if max_norm:
        norm = update_norm(update, reference)
        if not norm <= max_norm:
            raise AdapterMismatch(f"change has L2 norm {norm:.4g}, above the bound {max_norm}")
    return update


def update_norm(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None
) -> float:
    """L2 norm of update - reference over all tensors (of the update itself without one)."""
    total = 0.0
    for key, value in update.items():
        delta = value.astype(np.float64)
        if reference is not None:
            delta = delta - reference[key]
        total += float(np.square(delta).sum())
    return math.sqrt(total)


def clip_update(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], clip_norm: float
) -> dict[str, np.ndarray]:
    """Scale the change from `reference` down to L2 norm `clip_norm` (unchanged if within)."""
    norm = update_norm(update, reference)
    if norm <= clip_norm or norm == 0.0:
        return dict(update)
    factor = clip_norm / norm
    return {
        k: (reference[k] + factor * (v - reference[k])).astype(v.dtype) for k, v in update.items()
    }


def lora_product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """B·A for a Linear (B: out x r, A: r x in) or a Conv2d LoRA pair, flattened to 2-D."""
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


@dataclass
class RoundStats:
    """What happened to the updates of one round (the ServerApp logs and saves it)."""

    server_round: int
    payload_bytes: int = 0  # sent to each sampled node
    sampled: int = 0
    upload_bytes: dict[int, int] = field(default_factory=dict)  # node id -> bytes received
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> reason
    failed: dict[int, str] = field(default_factory=dict)  # node id -> error reply reason
    node_names: dict[int, str] = field(default_factory=dict)
    aggregated: bool = False
    secure: bool = False  # the replies carried SecAgg+'s aggregate, no individual update
    train_metrics: dict[str, float] = field(default_factory=dict)  # weighted over nodes
    # metrics only some replies had (node name -> its num-examples and those keys): the
    # weighted mean above keeps only the keys every reply has (e.g. a label-free node's
    # pseudo-label figures in a mixed fleet)
    partial_train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    memory_upload_bytes: dict[int, int] = field(default_factory=dict)  # share-memories
    memory_download_bytes: dict[int, int] = field(default_factory=dict)  # forwarded to it


class ValidatedAggregation:
    """Screens replies, then lets the Flower strategy it is mixed into aggregate.

    Put it first in the bases: `class X(ValidatedAggregation, FedAvg)`.
    """

    def __init__(
        self,
        spec: UpdateSpec,
        *,
        max_update_norm: float = 0.0,
        min_updates: int = 1,
        share_memories: bool = False,
        **strategy_kwargs,
    ) -> None:
        super().__init__(**strategy_kwargs)  # type: ignore[call-arg]
        self.spec = spec
        self.max_update_norm = max_update_norm
        self.min_updates = min_updates
        self.share_memories = share_memories
        self.memories: dict[int, SharedMemories] = {}  # node id -> its latest shared memories
        self.rounds: dict[int, RoundStats] = {}
        self._global: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ hooks
    def transform_update(
        self, update: dict[str, np.ndarray], reference: Mapping[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """Applied to each valid update before aggregation (robust strategies clip here)."""
        return update

    # ------------------------------------------------------------------ Flower API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.begin_round(server_round, arrays, sampled=len(messages))
        return self.forward_memories(server_round, messages)

    def begin_round(self, server_round: int, arrays: ArrayRecord, *, sampled: int = 0) -> None:
        """Remember the round's global adapter: updates are judged by their change from it."""
        self._global = {k: a.numpy().astype(np.float64) for k, a in arrays.items()}
        self.rounds[server_round] = RoundStats(
            server_round, payload_bytes=self.spec.nbytes, sampled=sampled
        )

    def forward_memories(self, server_round: int, messages: list[Message]) -> list[Message]:
        """Give each sampled node that shares the other nodes' latest memories (its own
        message content: Flower's strategies send one RecordDict to all)."""
        if not self.share_memories or not self.memories:
            return messages
        sources = sorted(self.memories)  # the forwarded key says which source, not its id
        stats = self.rounds[server_round]
        for msg in messages:
            node = msg.metadata.dst_node_id
            others = [(i, self.memories[n]) for i, n in enumerate(sources) if n != node]
            pooled = pool(others) if node in self.memories else None
            if pooled is None:
                continue
            record = to_record(pooled)
            msg.content = RecordDict({**dict(msg.content.items()), SHARED_RECORD: record})
            stats.memory_download_bytes[node] = record.count_bytes()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats(server_round))
        accepted = self.screen_replies(list(replies), stats)
        if len(accepted) < self.min_updates:
            log.warning(
                "round %d: %d valid update(s), %d needed; the global adapter stays unchanged",
                server_round,
                len(accepted),
                self.min_updates,
            )
            return None, None
        stats.aggregated = True
        arrays, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        if stats.secure:  # every reply held the same unmasked average: it is the aggregate
            (arrays,) = accepted[0].content.array_records.values()
        if arrays is not None:  # numpy may widen; the global must keep the adapter's dtypes
            arrays = ArrayRecord(
                {k: Array(a.numpy().astype(self.spec.dtypes[k])) for k, a in arrays.items()}
            )
        if metrics is not None:
            stats.train_metrics = _plain(metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        usable = []
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "round %d: evaluation failed on node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            metrics = _only_metric_record(msg.content)
            if metrics is not None and _positive(metrics.get(NUM_EXAMPLES)):
                usable.append(msg)
        if not usable:
            return None
        _align_metric_keys(usable)
        metrics = super().aggregate_evaluate(server_round, usable)  # type: ignore[misc]
        if metrics is not None and server_round in self.rounds:
            self.rounds[server_round].evaluate_metrics = _plain(metrics)
        return metrics

    # ------------------------------------------------------------------ screening
    def screen_replies(self, replies: list[Message], stats: RoundStats) -> list[Message]:
        """The replies that may be aggregated; every other one is logged with its node."""
        secure = [m for m in replies if not m.has_error() and SECAGG_RECORD in m.content]
        if secure:
            return self._screen_aggregate(replies, secure, stats)
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                stats.failed[node] = msg.error.reason
                log.warning(
                    "round %d: node %d failed: %s", stats.server_round, node, msg.error.reason
                )
                continue
            name = _node_name(msg.content)
            if name:
                stats.node_names[node] = name
            self._take_memories(msg.content, stats, node, name)
            try:
                update = self._screen(msg.content, stats, node)
            except AdapterMismatch as err:
                stats.rejected[node] = str(err)
                log.warning(
                    "round %d: rejected the update of node %d%s: %s",
                    stats.server_round,
                    node,
                    f" ({name})" if name else "",
                    err,
                )
                continue
            update = self.transform_update(update, self._global)
            (key,) = msg.content.array_records.keys()
            msg.content[key] = ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in update.items()}
            )
            accepted.append(msg)
            stats.accepted.append(node)
        _align_metric_keys(accepted, stats)
        return accepted

    def _screen_aggregate(
        self, replies: list[Message], secure: list[Message], stats: RoundStats
    ) -> list[Message]:
        """SecAgg+ replies: one shared aggregate, checked once; per-node metrics only."""
        stats.secure = True
        for msg in replies:
            if msg.has_error():
                stats.failed[msg.metadata.src_node_id] = msg.error.reason
        if len(secure) != len(replies) - len(stats.failed):
            stats.rejected.update(
                {m.metadata.src_node_id: "clear update in a secure round" for m in replies
                 if not m.has_error() and SECAGG_RECORD not in m.content}
            )  # fmt: skip
            log.warning("round %d: clear updates in a secure round: none aggregated",
                        stats.server_round)  # fmt: skip
            return []
        first = secure[0].content.array_records.get("arrays")
        try:
            if first is None or any(
                m.content.array_records.get("arrays") is not first for m in secure
            ):
                raise AdapterMismatch("the secure replies do not share one aggregate")
            for msg in secure:
                if not _positive((_only_metric_record(msg.content) or {}).get(NUM_EXAMPLES)):
                    raise AdapterMismatch("a secure reply has no positive `num-examples`")
            check_update(first, self.spec, self._global, max_norm=self.max_update_norm)
        except AdapterMismatch as err:
            for msg in secure:
                stats.rejected[msg.metadata.src_node_id] = f"aggregate: {err}"
            log.warning("round %d: rejected the secure aggregate: %s", stats.server_round, err)
            return []
        for msg in secure:
            node = msg.metadata.src_node_id
            name = _node_name(msg.content)
            if name:
                stats.node_names[node] = name
            stats.accepted.append(node)
        _align_metric_keys(secure, stats)
        return secure

    def _take_memories(self, content: RecordDict, stats: RoundStats, node: int, name: str) -> None:
        """Take a reply's shared memories off it (the adapter is screened without them)."""
        if REPLY_RECORD not in content.array_records:
            return
        record = content.array_records[REPLY_RECORD]
        del content[REPLY_RECORD]
        who = f"node {node}" + (f" ({name})" if name else "")
        if not self.share_memories:
            log.warning("round %d: %s sent memories, but share-memories is off: dropped "
                        "unread", stats.server_round, who)  # fmt: skip
            return
        dims = {len(m.vectors[0]) for m in self.memories.values() if len(m)}
        try:
            memories = from_record(
                record, dim=next(iter(dims), None), camera_slots=True, where=f"memories of {who}"
            )
        except AdapterMismatch as err:
            log.warning("round %d: dropped the memories of %s: %s", stats.server_round, who, err)
            return
        self.memories[node] = memories
        stats.memory_upload_bytes[node] = record.count_bytes()

    def _screen(self, content: RecordDict, stats: RoundStats, node: int) -> dict[str, np.ndarray]:
        if len(content.array_records) != 1:
            raise AdapterMismatch(
                f"expected exactly one ArrayRecord, got {len(content.array_records)}"
            )
        metrics = _only_metric_record(content)
        if metrics is None:
            raise AdapterMismatch("expected exactly one MetricRecord with `num-examples`")
        if not _positive(metrics.get(NUM_EXAMPLES)):
            raise AdapterMismatch(
                f"`num-examples` must be a positive number, got {metrics.get(NUM_EXAMPLES)!r}"
            )
        (arrays,) = content.array_records.values()
        update = check_update(arrays, self.spec, self._global, max_norm=self.max_update_norm)
        stats.upload_bytes[node] = sum(v.nbytes for v in update.values())
        return update


def _only_metric_record(content: RecordDict) -> MetricRecord | None:
    records = list(content.metric_records.values())
    return records[0] if len(records) == 1 else None


def _plain(metrics: MetricRecord) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _node_name(content: RecordDict) -> str:
    record = content.config_records.get(NODE_RECORD)
    name = record.get("node-name") if record is not None else None
    return name if isinstance(name, str) else ""


def _align_metric_keys(messages: list[Message], stats: RoundStats | None = None) -> None:
    """Keep only the metric keys every reply has, so Flower's consistency check passes;
    the others go to `stats.partial_train_metrics`, per node.

    A node without a local held-out split cannot report local Rank-1; that must not throw
    away the whole round.
    """
    if not messages:
        return
    records = [_only_metric_record(m.content) for m in messages]
    common = set.intersection(*(set(r.keys()) for r in records if r is not None))
    for msg, record in zip(messages, records, strict=True):
        if record is not None and set(record.keys()) != common:
            if stats is not None:
                node = stats.node_names.get(msg.metadata.src_node_id, str(msg.metadata.src_node_id))
                stats.partial_train_metrics[node] = {
                    k: v for k, v in _plain(record).items() if k not in common or k == NUM_EXAMPLES
                }
            (key,) = msg.content.metric_records.keys()
            msg.content[key] = MetricRecord({k: record[k] for k in record if k in common})


# ---------------------------------------------------------------------- strategies
class FedIT(ValidatedAggregation, FedAvg):
    """`fedavg`: weighted FedAvg of LoRA A and B separately (the common baseline)."""


class FfaLoRA(FedIT):
    """`ffa`: only B travels (A is the shared seeded init), so FedAvg of B is exact."""

    def __init__(self, spec: UpdateSpec, **kwargs) -> None:
        from common.lora import is_lora_a

        a_keys = [k for k in spec.shapes if is_lora_a(k)]
        if a_keys:
            raise ConfigError(f"FFA-LoRA sends B only, but the payload holds {a_keys[:2]}")
        super().__init__(spec, **kwargs)


class RandomWalk(FedIT):
    """`random-walk`: seed 004's alternative to averaging. The adapter visits one node per
    round and the update that node trains is the next global adapter (FedAvg of a single
    reply: itself). The walk is a seeded shuffle of the connected nodes, every node once
    before any twice, so over `n` rounds it costs what one FedAvg round of `n` nodes does.
    A node that leaves is skipped; one that never answers leaves the adapter unchanged
    (`min-updates`)."""

    def __init__(self, spec: UpdateSpec, *, seed: int = 0, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self._rng = random.Random(seed)
        self._walk: list[int] = []
        self.visits: dict[int, int] = {}  # server round -> node id

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # wait (like FedAvg) until `min-nodes` are connected before the walk starts
        _, connected = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        node = self.visits[server_round] = self.next_node(connected)
        log.info("configure_train: the random walk visits node %d", node)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, [node], MessageType.TRAIN))
        self.begin_round(server_round, arrays, sampled=len(messages))
        return self.forward_memories(server_round, messages)

    def next_node(self, connected: Iterable[int]) -> int:
        """The walk's next node among those connected now (a new pass when one ends)."""
        present = set(connected)
        self._walk = [n for n in self._walk if n in present]
        if not self._walk:
            self._walk = self._rng.sample(sorted(present), len(present))
        return self._walk.pop(0)


class _Clipping(ValidatedAggregation):
    def __init__(self, spec: UpdateSpec, *, clip_norm: float, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self.clip_norm = clip_norm

    def transform_update(self, update, reference):
        if not self.clip_norm or reference is None:
            return update
        return clip_update(update, reference, self.clip_norm)


class RobustTrimmedAvg(_Clipping, FedTrimmedAvg):
    """`robust` + trimmed: clip each update's change, then coordinate-wise trimmed mean."""


class RobustMedian(_Clipping, FedMedian):
    """`robust` + median: clip each update's change, then coordinate-wise median."""


def build_strategy(cfg: FlConfig, spec: UpdateSpec) -> ValidatedAggregation:
    """The strategy `cfg.strategy` names, sampling and validation set from the config."""
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": cfg.min_nodes,
        "max_update_norm": cfg.max_update_norm,
        "min_updates": cfg.min_updates,
        "share_memories": cfg.share_memories,
    }
    if cfg.strategy == "fedavg":
        return FedIT(spec, **common)
    if cfg.strategy == "ffa":
        return FfaLoRA(spec, **common)
    if cfg.strategy == "random-walk":
        return RandomWalk(spec, seed=cfg.seed, **{**common, "min_train_nodes": 1})
    if cfg.robust_aggregator == "median":
        return RobustMedian(spec, clip_norm=cfg.clip_norm, **common)
    return RobustTrimmedAvg(spec, clip_norm=cfg.clip_norm, beta=cfg.trim_beta, **common)
