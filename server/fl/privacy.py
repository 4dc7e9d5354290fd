"""Private training on the server: Flower's SecAgg+ under a Message-API strategy, Flower's
central-DP wrappers, and an RDP accountant that states epsilon.

How SecAgg+ meets the Message API (flwr 1.41). Flower ships SecAgg+ only in the legacy
workflow API: `flwr.server.workflow.SecAggPlusWorkflow` runs its four stages (setup, share
keys, collect masked vectors, unmask) against a `LegacyContext` whose legacy `Strategy`
samples nodes (`configure_fit`) and receives the unmasked result (`aggregate_fit`). The
Message-API `Strategy.start` has no such hook: it calls `grid.send_and_receive(messages)`
once for the train messages and hands the replies to `aggregate_train`.

`SecAggPlusGrid` joins the two with the fewest moving parts: it wraps the Grid that
`Strategy.start` is given. A batch of TRAIN messages (what `configure_train` built: the
sampled nodes, each with the global adapter and the round plan) is not sent as it is; the
wrapper runs Flower's own `SecAggPlusWorkflow` stages for exactly those nodes and contents
(a two-method legacy strategy, `_Sampled`, stands in for sampling and collects the result),
and answers `send_and_receive` with one reply per node whose masked vector went into the
sum: the node's clear metrics (`num-examples`, loss, Flower's DP norm bit) and, as its
ArrayRecord, the unmasked weighted average, the same for every reply. The strategy and any
DP wrapper around it then run unchanged: FedAvg of identical arrays is that average, the
DP wrapper adds its noise to it. Every other message (evaluation, hand-over) passes
through. On the node, `secaggplus_mod` does the masking (edge_node/fl/client_app.py).

What the server process holds under SecAgg+: public keys, encrypted key shares it
forwards, each node's masked vector (uniformly random mod 2**32 without the other nodes'
masks), the key shares that remove the masks of the sum, and the sum. It never builds an
individual update; `SecAggPlusGrid.exposed` records every ArrayRecord it received so a
test can check that.

Accounting: every round releases the clipped mean plus Gaussian noise of standard deviation
z * C / n (Flower's `compute_stdv`), i.e. the Gaussian mechanism with noise multiplier z on
a sum of sensitivity C: node-level DP (add or remove one node's whole update).
`rdp_epsilon` composes it over the rounds with Google's `dp-accounting` RDP accountant.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp import Grid

if TYPE_CHECKING:
    from server.fl.run_config import FlConfig

log = logging.getLogger("flwr").getChild(__name__)

SECAGG_RECORD = "secagg"  # ConfigRecord on a SecAggPlusGrid reply: {"aggregate": True, ...}
ARRAYS, METRICS, NODE = "arrays", "metrics", "node"
NODE_NAME_METRIC = "node-name"  # carried in the legacy FitRes metrics under SecAgg+


# ---------------------------------------------------------------------- accounting
def rdp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` releases of the sampled Gaussian mechanism.

    Google's dp-accounting RDP accountant, add-or-remove-one-node neighbours; sampling rate
    1 is plain composition of `rounds` Gaussian mechanisms with noise multiplier z.
    """
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if rounds <= 0:
        return 0.0
    event: Any = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant = RdpAccountant()
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@dataclass
class PrivacyLedger:
    """Epsilon so far: one Gaussian release per round that aggregated."""

    noise_multiplier: float
    sampling_rate: float
    delta: float
    releases: int = 0

    @classmethod
    def from_config(cls, cfg: FlConfig) -> PrivacyLedger | None:
        if cfg.dp == "off":
            return None
        rate = cfg.fraction_train if cfg.dp_amplification else 1.0
        return cls(cfg.dp_noise_multiplier, rate, cfg.dp_delta)

    def release(self) -> None:
        self.releases += 1

    @property
    def epsilon(self) -> float:
        return rdp_epsilon(self.noise_multiplier, self.sampling_rate, self.releases, self.delta)

    def epsilon_after(self, releases: int) -> float:
        return rdp_epsilon(self.noise_multiplier, self.sampling_rate, releases, self.delta)


def wrap_dp(cfg: FlConfig, strategy):
    """The strategy inside the Flower DP wrapper `cfg.dp` names (or itself when off)."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    if cfg.dp == "off":
        return strategy
    n = cfg.min_nodes
    if cfg.dp.endswith("-fixed"):
        cls = (
            DifferentialPrivacyClientSideFixedClipping
            if cfg.dp == "client-fixed"
            else DifferentialPrivacyServerSideFixedClipping
        )
        return cls(strategy, cfg.dp_noise_multiplier, cfg.dp_clip_norm, n)
    cls = (
        DifferentialPrivacyClientSideAdaptiveClipping
        if cfg.dp == "client-adaptive"
        else DifferentialPrivacyServerSideAdaptiveClipping
    )
    return cls(
        strategy,
        cfg.dp_noise_multiplier,
        n,
        initial_clipping_norm=cfg.dp_clip_norm,
        target_clipped_quantile=cfg.dp_target_quantile,
        clip_norm_lr=cfg.dp_clip_lr,
        clipped_count_stddev=cfg.dp_clipped_count_stddev or None,
    )


# ---------------------------------------------------------------------- SecAgg+
@dataclass
class SecAggRound:
    """What one SecAgg+ round cost and who made it into the sum."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)  # masked vector in the sum
    dropped: list[int] = field(default_factory=list)
    completed: bool = False
    halted_at: str = ""  # the stage that stopped the protocol, if one did
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    bytes_down: int = 0  # server -> nodes, all stages, record payload bytes
    bytes_up: int = 0  # nodes -> server
    masked_bytes: dict[int, int] = field(default_factory=dict)  # node -> masked vector
    exposed: int = 0  # ArrayRecords with data among the replies the server received
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampled": len(self.sampled),
            "survivors": len(self.survivors),
            "dropped": len(self.dropped),
            "completed": self.completed,
            "halted_at": self.halted_at,
            "seconds": round(self.seconds, 3),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "exposed_arrays": self.exposed,
            "loadavg": [round(x, 2) for x in self.loadavg],
        }


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a RecordDict: array data, bytes/str values, 8 per number."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
            continue
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


class _Counting:
    """The inner grid as SecAggPlusWorkflow sees it: counts bytes, times the stages."""

    def __init__(self, grid: Grid, stats: SecAggRound, exposed: list) -> None:
        self._grid, self._stats, self._exposed = grid, stats, exposed
        self._stage = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        self._stats.bytes_down += sum(record_bytes(m.content) for m in messages)
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        name = ("setup", "share-keys", "collect-masked", "unmask")[min(self._stage, 3)]
        self._stats.stage_seconds[name] = time.perf_counter() - t0
        self._stage += 1
        for reply in replies:
            if reply.has_error():
                continue
            size = record_bytes(reply.content)
            self._stats.bytes_up += size
            if name == "collect-masked":
                self._stats.masked_bytes[reply.metadata.src_node_id] = size
            for record in reply.content.array_records.values():
                if len(record):  # an ArrayRecord with data reached the server
                    self._exposed.append((reply.metadata.src_node_id, record))
                    self._stats.exposed += 1
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class SecAggPlusGrid(Grid):
    """A Grid whose train rounds go through Flower's SecAgg+ (see the module docstring)."""

    def __init__(self, grid: Grid, cfg: FlConfig) -> None:
        from flwr.server.workflow import SecAggPlusWorkflow

        shares, threshold = cfg.secagg_shares()
        self._grid = grid
        self.workflow = SecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=threshold,
            max_weight=cfg.secagg_max_weight,
            clipping_range=cfg.secagg_clipping_range,
            quantization_range=cfg.secagg_quantization_range,
            modulus_range=cfg.secagg_modulus_range,
            timeout=cfg.round_timeout,
        )
        self.rounds: dict[int, SecAggRound] = {}
        # (node, ArrayRecord) for every non-empty ArrayRecord a train reply carried: under
        # SecAgg+ this must stay empty (secaggplus_mod clears the node's arrays).
        self.exposed: list[tuple[int, ArrayRecord]] = []

    # ------------------------------------------------------------------ Grid, delegated
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        return self.secure_round(messages)

    # ------------------------------------------------------------------ the protocol
    def secure_round(self, messages: list[Message]) -> list[Message]:
        """Run SecAgg+ for these train messages; one reply per node in the unmasked sum."""
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        first = messages[0].content
        server_round = int(first.config_records["config"]["server-round"])
        keys = list(first.array_records[ARRAYS].keys())
        dtypes = {k: a.dtype for k, a in first.array_records[ARRAYS].items()}
        stats = self.rounds[server_round] = SecAggRound(
            server_round, sampled=[m.metadata.dst_node_id for m in messages]
        )
        sampled = _Sampled(self._grid, messages)
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=sampled,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        grid = _Counting(self._grid, stats, self.exposed)
        state = WorkflowState()
        workflow = self.workflow
        t0 = time.perf_counter()
        stages = (
            ("setup", workflow.setup_stage),
            ("share-keys", workflow.share_keys_stage),
            ("collect-masked", workflow.collect_masked_vectors_stage),
            ("unmask", workflow.unmask_stage),
        )
        for name, stage in stages:
            if name == "share-keys":
                # Flower's setup stage sampled the nodes through `_Sampled`; what each of
                # them is sent in the masked-vector stage is its own Message-API content
                # (a copy per node: the stage adds that node's key shares to it).
                state.nid_to_fitins = {
                    m.metadata.dst_node_id: RecordDict(dict(m.content.items())) for m in messages
                }
            if not stage(grid, context, state):  # type: ignore[arg-type]
                stats.halted_at = name
                break
        stats.seconds = time.perf_counter() - t0
        stats.loadavg = os.getloadavg()
        stats.survivors = sorted(node for node, _, _ in sampled.collected)
        stats.dropped = sorted(set(stats.sampled) - set(stats.survivors))
        stats.completed = not stats.halted_at and sampled.aggregate is not None
        if not stats.completed:
            log.warning(
                "round %d: secure aggregation halted at its %s stage (%d of %d nodes left, "
                "threshold %d): no aggregate this round",
                server_round,
                stats.halted_at or "unmask",
                len(state.active_node_ids),
                len(stats.sampled),
                state.threshold,
            )
            return []
        log.info(
            "round %d: SecAgg+ summed %d of %d updates (%d dropped) in %.2fs, %d B down, %d B up",
            server_round,
            len(stats.survivors),
            len(stats.sampled),
            len(stats.dropped),
            stats.seconds,
            stats.bytes_down,
            stats.bytes_up,
        )
        aggregate = ArrayRecord(
            {
                k: Array(np.ascontiguousarray(v, dtype=dtypes[k]))
                for k, v in zip(keys, sampled.aggregate, strict=True)
            }
        )
        by_node = {m.metadata.dst_node_id: m for m in messages}
        replies = []
        for node, num_examples, metrics in sampled.collected:
            name = metrics.pop(NODE_NAME_METRIC, "")
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            content = RecordDict(
                {
                    ARRAYS: aggregate,
                    METRICS: MetricRecord({**numbers, "num-examples": num_examples}),
                    SECAGG_RECORD: ConfigRecord(
                        {"aggregate": True, "survivors": len(stats.survivors)}
                    ),
                }
            )
            if name:
                content[NODE] = ConfigRecord({"node-name": str(name)})
            replies.append(Message(content=content, reply_to=by_node[node]))
        return replies


class _Sampled(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow asks: samples exactly the nodes the
    Message-API strategy chose, and collects the unmasked aggregate."""

    def __init__(self, grid: Grid, messages: list[Message]) -> None:
        self._grid, self._messages = grid, messages
        self.aggregate: list[np.ndarray] | None = None
        self.collected: list[tuple[int, int, dict]] = []  # (node, num-examples, metrics)

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, Parameters
        from flwr.server.compat.grid_client_proxy import GridClientProxy

        empty = FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {})
        return [
            (GridClientProxy(m.metadata.dst_node_id, self._grid, 0), empty) for m in self._messages
        ]

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        if results:
            # Flower sets every FitRes's parameters to the one unmasked weighted average
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        self.collected = [
            (proxy.node_id, int(res.num_examples), dict(res.metrics)) for proxy, res in results
        ]
        return None, {}

    # not used by SecAggPlusWorkflow
    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None
