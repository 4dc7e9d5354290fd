"""Privacy parts without a Flower run: the accountant, the config keys, the node's own
checks, and the gate's handling of SecAgg+ replies."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from common.errors import AdapterMismatch, ConfigError
from common.round_plan import RoundPlan
from edge_node.fl.privacy import guard_update
from server.fl.privacy import PrivacyLedger, rdp_epsilon, wrap_dp
from server.fl.run_config import FlConfig
from server.fl.strategies import FedIT, UpdateSpec

# dp-accounting's default RDP orders, written out: the hand check must not borrow them
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """By hand: T Gaussian mechanisms have RDP T*a/(2 z^2) at order a (Mironov 2017); to
    (eps, delta) with Balle et al. 2020, Prop. 12 (what dp-accounting uses), best order."""
    return min(
        rounds * a / (2 * z * z) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a in ORDERS
    )


@pytest.mark.parametrize(("z", "rounds", "delta"), [(1.0, 1, 1e-5), (2.0, 8, 1e-5), (0.5, 3, 1e-3)])
def test_epsilon_is_the_accountants_and_the_hand_computed_value(z, rounds, delta):
    eps = rdp_epsilon(z, 1.0, rounds, delta)
    assert eps == pytest.approx(gaussian_epsilon(z, rounds, delta), rel=1e-9)
    cfg = FlConfig(dp="client-fixed", dp_noise_multiplier=z, dp_delta=delta, min_nodes=3)
    ledger = PrivacyLedger.from_config(cfg)
    for _ in range(rounds):
        ledger.release()
    assert ledger.epsilon == eps  # what history.json and report.json state


def test_epsilon_hand_value_z1_one_round():
    # z = 1, one round, delta 1e-5: the best order is about 5.6, epsilon about 4.73
    assert rdp_epsilon(1.0, 1.0, 1, 1e-5) == pytest.approx(4.7285, abs=1e-3)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    assert rdp_epsilon(1.0, 1.0, 4, 1e-5) > rdp_epsilon(1.0, 1.0, 2, 1e-5)
    assert rdp_epsilon(2.0, 1.0, 4, 1e-5) < rdp_epsilon(1.0, 1.0, 4, 1e-5)
    assert rdp_epsilon(1.0, 0.1, 4, 1e-5) < rdp_epsilon(1.0, 1.0, 4, 1e-5)
    assert rdp_epsilon(1.0, 1.0, 0, 1e-5) == 0.0


def test_amplification_only_when_asked():
    cfg = FlConfig(dp="client-fixed", fraction_train=0.5, min_nodes=3)
    assert PrivacyLedger.from_config(cfg).sampling_rate == 1.0
    cfg = FlConfig(dp="client-fixed", fraction_train=0.5, dp_amplification=True, min_nodes=3)
    assert PrivacyLedger.from_config(cfg).sampling_rate == 0.5
    assert PrivacyLedger.from_config(FlConfig()) is None


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"strategy": "fedsgd"}, "`strategy`"),
        ({"num-server-round": 3}, "num-server-round"),
        ({"dp": "local"}, "`dp`"),
        ({"dp": "client-fixed", "dp-noise-multiplier": 0.0}, "`dp-noise-multiplier`"),
        ({"dp-delta": 1.5}, "`dp-delta`"),
        ({"dp-clip-norm": 0.0}, "`dp-clip-norm`"),
        ({"secure-aggregation": True, "min-nodes": 2}, "`min-nodes`"),
        ({"secure-aggregation": True, "min-nodes": 3, "dp": "server-fixed"}, "`dp`"),
        ({"secure-aggregation": True, "min-nodes": 3, "strategy": "robust"}, "`strategy`"[1:-1]),
        (
            {
                "secure-aggregation": True,
                "min-nodes": 4,
                "num-shares": 4,
                "reconstruction-threshold": 4,
            },
            "`reconstruction-threshold`",
        ),
        ({"secagg-modulus-range": 1000}, "`secagg-modulus-range`"),
        ({"dp": "client-adaptive", "dp-noise-multiplier": 1.0}, "`dp-clipped-count-stddev`"),
        ({"dp": "client-fixed", "strategy": "robust"}, "averaging strategy"),
    ],
)
def test_bad_privacy_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        FlConfig.from_run_config({}, overrides)


def test_secagg_defaults_and_plan_keys():
    cfg = FlConfig.from_run_config({}, {"secure-aggregation": True, "min-nodes": 4})
    assert cfg.secagg_shares() == (4, 3)
    assert FlConfig(secure_aggregation=True, min_nodes=3).secagg_shares() == (3, 2)
    plan = cfg.round_plan()
    assert plan.update_clip_norm == cfg.max_update_norm  # nodes clip what the gate cannot see
    assert FlConfig().round_plan().update_clip_norm == 0.0  # clear text: the gate rejects
    # Flower's DP wrappers add `clipping_norm` to the round config: the plan ignores it
    config = {**plan.to_config(), "clipping_norm": 0.1}
    assert RoundPlan.from_config(config) == plan
    with pytest.raises(ConfigError, match="clip-norm-typo"):
        RoundPlan.from_config({**plan.to_config(), "clip-norm-typo": 1})


def test_dp_wrappers_are_flowers():
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    spec = UpdateSpec({"b": (2, 2)}, {"b": "float32"})
    inner = FedIT(spec)
    assert wrap_dp(FlConfig(), inner) is inner
    fixed = wrap_dp(FlConfig(dp="client-fixed", dp_clip_norm=0.2, min_nodes=3), inner)
    assert isinstance(fixed, DifferentialPrivacyClientSideFixedClipping)
    assert (fixed.clipping_norm, fixed.num_sampled_clients) == (0.2, 3)
    server = wrap_dp(FlConfig(dp="server-fixed", min_nodes=3), inner)
    assert isinstance(server, DifferentialPrivacyServerSideFixedClipping)
    adaptive = wrap_dp(
        FlConfig(dp="client-adaptive", dp_noise_multiplier=0.5, dp_clipped_count_stddev=1.0),
        inner,
    )
    assert isinstance(adaptive, DifferentialPrivacyClientSideAdaptiveClipping)


# ---------------------------------------------------------------------- the node's guard
def _state(*values: float) -> dict[str, torch.Tensor]:
    return {f"k{i}": torch.full((2, 3), v) for i, v in enumerate(values)}


def test_guard_clips_the_change_to_the_bound_and_keeps_dtypes():
    ref = _state(0.0, 1.0)
    upd = _state(3.0, 5.0)  # change: 3 and 4 on 6 entries each -> norm sqrt(6*9+6*16)
    norm = math.sqrt(6 * 9 + 6 * 16)
    out, before = guard_update(upd, ref, clip_norm=1.0)
    assert before == pytest.approx(norm)
    after = math.sqrt(sum(float((out[k] - ref[k]).double().square().sum()) for k in out))
    assert after == pytest.approx(1.0, rel=1e-6)
    assert all(out[k].dtype == torch.float32 for k in out)
    # direction kept
    assert float(out["k0"][0, 0] - ref["k0"][0, 0]) == pytest.approx(3 / norm, rel=1e-5)
    same, _ = guard_update(upd, ref, clip_norm=0.0)  # no bound: unchanged
    assert all(torch.equal(same[k], upd[k]) for k in upd)


def test_guard_refuses_non_finite_and_foreign_shapes():
    ref = _state(0.0)
    with pytest.raises(AdapterMismatch, match="NaN"):
        guard_update({"k0": torch.full((2, 3), float("nan"))}, ref)
    with pytest.raises(AdapterMismatch, match="k0"):
        guard_update({"k0": torch.zeros(3, 2)}, ref)
    with pytest.raises(AdapterMismatch, match="keys"):
        guard_update({"other": torch.zeros(2, 3)}, ref)


# ---------------------------------------------------------------------- the gate under SecAgg
def _reply(node: int, content: RecordDict) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(metadata=meta, content=content)


def _secure_replies(aggregate: ArrayRecord, nodes=(1, 2, 3)) -> list[Message]:
    return [
        _reply(
            n,
            RecordDict(
                {
                    "arrays": aggregate,
                    "metrics": MetricRecord({"num-examples": 10 * n, "train-loss": 1.0}),
                    "secagg": ConfigRecord({"aggregate": True, "survivors": len(nodes)}),
                    "node": ConfigRecord({"node-name": f"cam{n}"}),
                }
            ),
        )
        for n in nodes
    ]


def _gate():
    spec = UpdateSpec({"b": (2, 3)}, {"b": "float32"})
    strategy = FedIT(spec, max_update_norm=10.0)
    strategy.begin_round(1, ArrayRecord({"b": Array(np.zeros((2, 3), np.float32))}), sampled=3)
    return strategy


def test_secure_round_aggregates_exactly_the_unmasked_average():
    strategy = _gate()
    mean = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    arrays, metrics = strategy.aggregate_train(1, _secure_replies(ArrayRecord({"b": Array(mean)})))
    assert np.array_equal(arrays["b"].numpy(), mean)  # taken as it is, not re-averaged
    stats = strategy.rounds[1]
    assert stats.secure and stats.aggregated
    assert sorted(stats.node_names.values()) == ["cam1", "cam2", "cam3"]
    assert metrics["train-loss"] == pytest.approx(1.0)


def test_secure_round_refuses_an_individual_update_in_the_clear():
    strategy = _gate()
    mean = ArrayRecord({"b": Array(np.full((2, 3), 0.1, np.float32))})
    replies = _secure_replies(mean, nodes=(1, 2))
    clear = _reply(
        3,
        RecordDict(
            {
                "arrays": ArrayRecord({"b": Array(np.full((2, 3), 0.5, np.float32))}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
    )
    arrays, _ = strategy.aggregate_train(1, [*replies, clear])
    assert arrays is None
    assert strategy.rounds[1].rejected[3] == "clear update in a secure round"


def test_secure_round_checks_the_aggregate():
    strategy = _gate()
    bad = ArrayRecord({"b": Array(np.full((2, 3), np.inf, np.float32))})
    arrays, _ = strategy.aggregate_train(1, _secure_replies(bad))
    assert arrays is None
    assert all("NaN or inf" in r for r in strategy.rounds[1].rejected.values())
    strategy = _gate()
    replies = _secure_replies(ArrayRecord({"b": Array(np.zeros((2, 3), np.float32))}))
    replies[0].content["arrays"] = ArrayRecord({"b": Array(np.ones((2, 3), np.float32))})
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None  # replies that do not share one aggregate: nothing aggregated


def test_server_app_fails_a_bad_run_config_with_one_line_naming_the_key():
    import logging

    from flwr.app import Context

    from server.fl.server_app import build_server_app

    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("flwr").getChild("server.fl.server_app")
    handler = Lines(logging.ERROR)
    logger.addHandler(handler)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    try:
        with pytest.raises(ConfigError, match="`strategy`"):
            build_server_app({"strategy": "fedsgd"})(grid=None, context=context)
    finally:
        logger.removeHandler(handler)
    assert len(lines) == 1
    assert lines[0].startswith("federated run failed: invalid run config: `strategy`")
