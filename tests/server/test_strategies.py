"""Aggregation math and the validation gate, with real Flower Messages and hand-made updates."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from common.errors import AdapterMismatch, ConfigError
from common.lora import is_lora_a
from server.fl.run_config import FlConfig
from server.fl.strategies import (
    FedIT,
    FfaLoRA,
    RandomWalk,
    RobustMedian,
    RobustTrimmedAvg,
    UpdateSpec,
    build_strategy,
    check_update,
    clip_update,
    lora_product,
)

RNG = np.random.default_rng(0)
A_KEY = "base_model.model.layer.lora_A.weight"
B_KEY = "base_model.model.layer.lora_B.weight"
OUT, R, IN = 6, 2, 5


def _metadata(node: int, dst: int = 0) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=dst,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )


def reply(node: int, arrays: dict[str, np.ndarray], n: int = 10, **metrics) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, **metrics}),
            "node": ConfigRecord({"node-name": f"cam{node}"}),
        }
    )
    return Message(content, metadata=_metadata(node))


def failed(node: int) -> Message:
    return Message(Error(code=0, reason="ClientApp raised DatasetError"), metadata=_metadata(node))


def b_only(value: np.ndarray) -> dict[str, np.ndarray]:
    return {B_KEY: value.astype(np.float32)}


def spec_of(arrays: dict[str, np.ndarray]) -> UpdateSpec:
    return UpdateSpec.from_arrays(ArrayRecord({k: Array(v) for k, v in arrays.items()}))


def zeros_b() -> dict[str, np.ndarray]:
    return b_only(np.zeros((OUT, R)))


def ffa(**kwargs) -> FfaLoRA:
    strategy = FfaLoRA(spec_of(zeros_b()), **kwargs)
    strategy.begin_round(1, ArrayRecord({B_KEY: Array(zeros_b()[B_KEY])}), sampled=3)
    return strategy


def test_ffa_aggregate_is_the_exact_weighted_average_of_the_products():
    a = RNG.normal(size=(R, IN)).astype(np.float32)  # the shared, frozen A
    bs = [RNG.normal(size=(OUT, R)).astype(np.float32) for _ in range(3)]
    weights = [10, 30, 60]
    strategy = ffa()
    arrays, metrics = strategy.aggregate_train(
        1, [reply(i, b_only(b), n=w) for i, (b, w) in enumerate(zip(bs, weights, strict=True))]
    )
    agg_b = arrays[B_KEY].numpy()
    assert list(arrays.keys()) == [B_KEY]  # B only travels back
    assert agg_b.dtype == np.float32
    expected = sum(w * lora_product(b, a) for b, w in zip(bs, weights, strict=True)) / 100
    np.testing.assert_allclose(lora_product(agg_b, a), expected, rtol=1e-5, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx(1.0)


def test_the_test_keys_are_what_the_shared_predicate_sees():
    assert is_lora_a(A_KEY) and not is_lora_a(B_KEY)


def test_fedit_is_inexact_when_a_differs_but_ffa_refuses_to_send_a():
    # Why FFA exists: averaging A and B separately is not the average of B·A.
    a1, a2 = RNG.normal(size=(R, IN)), RNG.normal(size=(R, IN))
    b1, b2 = RNG.normal(size=(OUT, R)), RNG.normal(size=(OUT, R))
    fedit = lora_product((b1 + b2) / 2, (a1 + a2) / 2)
    exact = (lora_product(b1, a1) + lora_product(b2, a2)) / 2
    assert not np.allclose(fedit, exact)
    with pytest.raises(ConfigError, match="B only"):
        FfaLoRA(spec_of({A_KEY: np.zeros((R, IN), np.float32), **zeros_b()}))


def test_fedit_averages_a_and_b_weighted_by_num_examples():
    full = {A_KEY: np.zeros((R, IN), np.float32), B_KEY: np.zeros((OUT, R), np.float32)}
    strategy = FedIT(spec_of(full))
    strategy.begin_round(1, ArrayRecord({k: Array(v) for k, v in full.items()}))
    u1 = {k: np.full_like(v, 1.0) for k, v in full.items()}
    u2 = {k: np.full_like(v, 4.0) for k, v in full.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(1, u1, n=2), reply(2, u2, n=1)])
    for key in full:
        np.testing.assert_allclose(arrays[key].numpy(), 2.0)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b_only(np.full((OUT, R), np.nan)), "NaN"),
        (b_only(np.zeros((OUT, R + 1))), "shape"),
        ({B_KEY: np.zeros((OUT, R), np.float64)}, "dtype"),
        ({**zeros_b(), "base_model.model.text.weight": np.zeros(3, np.float32)}, "keys"),
        ({}, "keys"),
        (b_only(np.full((OUT, R), 1e3)), "norm"),
    ],
)
def test_a_bad_update_is_dropped_and_logged_with_its_node(bad, reason, caplog):
    good = b_only(np.ones((OUT, R)))
    strategy = ffa(max_update_norm=100.0)
    arrays, _ = strategy.aggregate_train(1, [reply(1, good), reply(2, good), reply(9, bad)])
    np.testing.assert_allclose(arrays[B_KEY].numpy(), 1.0)  # the bad one never got in
    stats = strategy.rounds[1]
    assert stats.accepted == [1, 2]
    assert list(stats.rejected) == [9]
    assert reason in stats.rejected[9]
    assert "node 9 (cam9)" in caplog.text


def test_bad_metrics_are_rejected_too():
    good = b_only(np.ones((OUT, R)))
    strategy = ffa()
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, good), reply(2, b_only(np.full((OUT, R), 5.0)), n=0)]
    )
    np.testing.assert_allclose(arrays[B_KEY].numpy(), 1.0)
    assert "num-examples" in strategy.rounds[1].rejected[2]


def test_a_failed_node_does_not_stop_the_round():
    strategy = ffa()
    arrays, _ = strategy.aggregate_train(
        1, [failed(3), reply(1, b_only(np.ones((OUT, R))), local_r1=50.0)]
    )
    np.testing.assert_allclose(arrays[B_KEY].numpy(), 1.0)
    assert "DatasetError" in strategy.rounds[1].failed[3]
    assert strategy.rounds[1].aggregated


def test_too_few_valid_updates_keep_the_global_unchanged():
    strategy = ffa(min_updates=2)
    arrays, metrics = strategy.aggregate_train(
        1,
        [
            failed(3),
            reply(1, b_only(np.ones((OUT, R)))),
            reply(2, b_only(np.full((OUT, R), np.inf))),
        ],
    )
    assert arrays is None and metrics is None
    assert not strategy.rounds[1].aggregated


def test_replies_with_different_metric_keys_still_aggregate():
    # A node without a held-out split reports no local Rank-1; Flower would refuse the round.
    strategy = ffa()
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, b_only(np.ones((OUT, R))), local_r1=40.0), reply(2, b_only(np.ones((OUT, R))))]
    )
    assert arrays is not None
    assert "local_r1" not in metrics and "train-loss" in metrics


def test_clip_update_scales_the_change_only():
    ref = {"w": np.ones(4)}
    update = {"w": np.ones(4, np.float32) + np.array([3, 4, 0, 0], np.float32)}
    clipped = clip_update(update, ref, 1.0)
    np.testing.assert_allclose(clipped["w"], [1.6, 1.8, 1.0, 1.0], rtol=1e-6)
    assert clipped["w"].dtype == np.float32
    assert clip_update(update, ref, 10.0)["w"] is not None


def test_robust_median_with_clipping_resists_one_outlier():
    honest = [b_only(np.full((OUT, R), v)) for v in (0.1, 0.12, 0.11)]
    attacker = b_only(np.full((OUT, R), 50.0))
    for cls, kwargs in ((RobustMedian, {}), (RobustTrimmedAvg, {"beta": 0.25})):
        strategy = cls(spec_of(zeros_b()), clip_norm=1.0, max_update_norm=1e6, **kwargs)
        strategy.begin_round(1, ArrayRecord({B_KEY: Array(zeros_b()[B_KEY])}))
        replies = [reply(i, u) for i, u in enumerate(honest)] + [reply(9, attacker)]
        arrays, _ = strategy.aggregate_train(1, replies)
        agg = arrays[B_KEY].numpy()
        assert np.all(agg < 0.2), cls.__name__  # plain FedAvg would give ~12.6


def test_check_update_returns_numpy_arrays():
    arrays = ArrayRecord({B_KEY: Array(np.ones((OUT, R), np.float32))})
    update = check_update(arrays, spec_of(zeros_b()))
    assert update[B_KEY].shape == (OUT, R)
    with pytest.raises(AdapterMismatch, match="norm"):
        check_update(arrays, spec_of(zeros_b()), {B_KEY: np.zeros((OUT, R))}, max_norm=1.0)


def test_payload_bytes_are_the_raw_tensor_bytes():
    spec = spec_of({A_KEY: np.zeros((R, IN), np.float32), **zeros_b()})
    assert spec.nbytes == (R * IN + OUT * R) * 4


def test_build_strategy_follows_the_config():
    spec = spec_of(zeros_b())
    assert type(build_strategy(FlConfig(strategy="ffa"), spec)) is FfaLoRA
    assert type(build_strategy(FlConfig(strategy="fedavg"), spec)) is FedIT
    robust = build_strategy(FlConfig(strategy="robust", robust_aggregator="median"), spec)
    assert type(robust) is RobustMedian and robust.clip_norm == 1.0
    trimmed = build_strategy(FlConfig(strategy="robust", trim_beta=0.1, min_nodes=3), spec)
    assert type(trimmed) is RobustTrimmedAvg and trimmed.beta == 0.1
    assert trimmed.min_train_nodes == 3
    walk = build_strategy(FlConfig(strategy="random-walk", min_nodes=3, seed=5), spec)
    assert type(walk) is RandomWalk and walk.min_train_nodes == 1
    assert walk.min_available_nodes == 3  # the walk starts once every node is there


def test_the_random_walk_visits_every_node_once_per_pass_and_hands_its_update_on():
    """(`configure_train` builds the one message to `next_node`'s pick; Flower's Message
    needs a running app, so that glue runs in the simulation, docs/label-free.md.)"""
    spec = spec_of(b_only(np.zeros((OUT, R))))
    walk = build_strategy(FlConfig(strategy="random-walk", min_nodes=3, seed=1), spec)
    nodes, visits = [11, 12, 13], []
    for rnd in range(1, 10):
        visits.append(walk.next_node(nodes))
        walk.begin_round(rnd, ArrayRecord({B_KEY: Array(np.zeros((OUT, R), np.float32))}))
        update = b_only(np.full((OUT, R), float(rnd)))
        arrays, _ = walk.aggregate_train(rnd, [reply(visits[-1], update)])
        assert np.array_equal(arrays[B_KEY].numpy(), update[B_KEY])  # no averaging
    passes = [visits[i : i + 3] for i in (0, 3, 6)]
    assert all(sorted(p) == nodes for p in passes)  # each node once per pass
    assert len({tuple(p) for p in passes}) > 1  # and each pass in its own order
    again = build_strategy(FlConfig(strategy="random-walk", min_nodes=3, seed=1), spec)
    assert [again.next_node(nodes) for _ in range(9)] == visits  # seeded: the same walk
    left = again.next_node(nodes)
    remaining = [n for n in nodes if n != left]
    assert all(again.next_node(remaining) in remaining for _ in range(4))  # one that left: skipped


def test_random_walk_refuses_dp_and_secure_aggregation():
    with pytest.raises(ConfigError, match="random-walk"):
        FlConfig(strategy="random-walk", dp="server-fixed")


def test_fl_config_rejects_bad_values_naming_the_key():
    cfg = FlConfig.from_run_config({"num-server-rounds": 2, "lr": 1, "strategy": "fedavg"})
    assert cfg.lr == 1.0 and cfg.num_server_rounds == 2
    with pytest.raises(ConfigError, match="num-sever-rounds"):
        FlConfig.from_run_config({"num-sever-rounds": 2})
    with pytest.raises(ConfigError, match="strategy"):
        FlConfig.from_run_config({"strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="min-updates"):
        FlConfig.from_run_config({"min-nodes": 1, "min-updates": 2})
    overridden = FlConfig.from_run_config({"strategy": "ffa"}, {"strategy": "robust"})
    assert overridden.strategy == "robust" and not overridden.freeze_a


def test_pyproject_run_config_parses():
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    app = data["tool"]["flwr"]["app"]
    assert app["components"]["serverapp"] == "server.fl.server_app:app"
    cfg = FlConfig.from_run_config(app["config"])
    assert set(cfg.to_dict()) == set(app["config"])  # every key can be overridden by flwr run


def _with_memories(msg: Message, m: int, value: float = 1.0) -> Message:
    from common.memories import REPLY_RECORD, SharedMemories, to_record

    vectors = np.zeros((m, 4))
    vectors[:, 0] = 1.0
    spans = np.zeros((m, 2), dtype=np.int64)
    msg.content[REPLY_RECORD] = to_record(SharedMemories(value * vectors, np.zeros(m), spans))
    return msg


def _to(node: int, arrays: ArrayRecord) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({})})
    return Message(content, metadata=_metadata(0, dst=node))


def test_shared_memories_are_pooled_and_forwarded_to_the_other_nodes_that_share():
    from common.memories import CAMERA_STRIDE, SHARED_RECORD, from_record

    spec = spec_of(zeros_b())
    strategy = build_strategy(FlConfig(strategy="ffa", share_memories=True), spec)
    strategy.begin_round(1, ArrayRecord({B_KEY: Array(np.zeros((OUT, R), np.float32))}))
    replies = [
        _with_memories(reply(1, zeros_b()), 2),
        _with_memories(reply(2, zeros_b()), 3),
        reply(3, zeros_b()),  # does not share
        _with_memories(reply(4, zeros_b()), 2, value=2.0),  # not unit length: dropped
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    stats = strategy.rounds[1]
    assert arrays is not None and sorted(stats.accepted) == [1, 2, 3, 4]  # adapters all count
    assert sorted(strategy.memories) == [1, 2] and sorted(stats.memory_upload_bytes) == [1, 2]
    global_ = ArrayRecord({B_KEY: Array(np.zeros((OUT, R), np.float32))})
    strategy.begin_round(2, global_)
    out = strategy.forward_memories(2, [_to(n, global_) for n in (1, 2, 3)])
    got = {m.metadata.dst_node_id: m.content.array_records.get(SHARED_RECORD) for m in out}
    assert got[3] is None  # a node that shares nothing receives nothing
    to_1, to_2 = from_record(got[1]), from_record(got[2])
    assert len(to_1) == 3 and len(to_2) == 2  # the other's, never its own
    assert set(to_1.cameras.tolist()) == {CAMERA_STRIDE} and set(to_2.cameras.tolist()) == {0}
    assert "arrays" in out[0].content and "config" in out[0].content
    # with share-memories off, memories are dropped unread
    off = build_strategy(FlConfig(strategy="ffa"), spec)
    off.begin_round(1, global_)
    off.aggregate_train(1, [_with_memories(reply(1, zeros_b()), 2)])
    assert off.memories == {} and off.rounds[1].accepted == [1]


def test_share_memories_refuses_dp_and_secure_aggregation():
    for extra in ({"dp": "client-fixed", "dp_noise_multiplier": 0.5},
                  {"secure_aggregation": True, "min_nodes": 3}):  # fmt: skip
        with pytest.raises(ConfigError, match="share-memories"):
            FlConfig(share_memories=True, **extra)
