"""The round contract: what the server writes is what a node reads, and nothing else."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from flwr.app import ConfigRecord

from common.errors import ConfigError
from common.lora import get_adapter_state, is_lora_a, lora_a_digest
from common.round_plan import RoundPlan
from server.fl.run_config import FlConfig


def _plan(**changes) -> RoundPlan:
    cfg = FlConfig(model="tiny", strategy="ffa", lora_rank=4, lora_alpha=8, lr=0.01, seed=3)
    return dataclasses.replace(cfg.round_plan("ab" * 32, server_round=2), **changes)


def test_to_config_and_from_config_round_trip():
    plan = _plan()
    config = plan.to_config()
    assert all("_" not in key for key in config)  # kebab-case, as Flower's keys
    assert config["server-round"] == 2 and config["lora-a-digest"] == "ab" * 32
    assert isinstance(config["lora-alpha"], float) and isinstance(config["lr"], float)
    assert RoundPlan.from_config(config) == plan
    # through Flower's own record, as the message carries it
    assert RoundPlan.from_config(ConfigRecord(config)) == plan
    assert plan.final is False and _plan(server_round=3).final is True


def test_lr_decay_sets_each_round_peak_lr():
    """`none` keeps lr every round; `cosine` starts at lr and ends near 0, never rising."""
    rounds = [_plan(server_round=r, num_server_rounds=8) for r in range(1, 9)]
    assert [p.round_lr for p in rounds] == [0.01] * 8
    cosine = [dataclasses.replace(p, lr_decay="cosine").round_lr for p in rounds]
    assert cosine[0] == pytest.approx(0.01) and cosine[2] == pytest.approx(0.005 * (1 + 2**-0.5))
    assert all(a > b for a, b in itertools.pairwise(cosine)) and 0 < cosine[-1] < 0.001
    # the run config key travels to the node under the same name
    cfg = FlConfig(model="tiny", lr_decay="cosine")
    assert RoundPlan.from_config(cfg.round_plan().to_config()).lr_decay == "cosine"
    with pytest.raises(ConfigError, match="lr-decay"):
        FlConfig(model="tiny", lr_decay="step")


def test_server_and_node_agree():
    cfg = FlConfig(model="tiny", strategy="ffa", max_steps=2, batch_size=8, proximal_mu=0.1)
    server = cfg.round_plan()
    adapter = server.create_adapter()
    digest = lora_a_digest(get_adapter_state(adapter))
    server = dataclasses.replace(server, lora_a_digest=digest)
    sent = ConfigRecord(server.to_config())
    sent["server-round"] = 1  # what Flower's strategy does in every round
    node = RoundPlan.from_config(sent)
    assert node == dataclasses.replace(server, server_round=1)
    # every key the node reads comes from the run config of the same name
    run = cfg.to_dict()
    for key, value in node.to_config().items():
        if key in run:
            assert value == run[key], key
    assert node.freeze_a == cfg.freeze_a and node.lora_a_digest == digest
    # and the node builds the very adapter the server built: same keys, same frozen A
    node_state = get_adapter_state(node.create_adapter())
    assert list(node_state) == list(get_adapter_state(adapter))
    assert any(is_lora_a(k) for k in node_state)
    assert lora_a_digest(node_state) == digest
    assert node.adapter_key == server.adapter_key


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", -1.0, "`lr`"),
        ("lr", "fast", "round config.lr"),
        ("batch-size", 1, "`batch-size`"),
        ("lora-rank", -2, "`lora-rank`"),
        ("proximal-mu", float("nan"), "`proximal-mu`"),
        ("num-server-rounds", 0, "`num-server-rounds`"),
        ("model", " ", "`model`"),
        ("freeze-a", "yes", "round config.freeze-a"),
        ("lr-decay", "linear", "`lr-decay`"),
    ],
)
def test_a_bad_value_is_refused_by_name(key, value, message):
    config = {**_plan().to_config(), key: value}
    with pytest.raises(ConfigError, match="round config") as err:
        RoundPlan.from_config(config)
    assert message in str(err.value)


def test_missing_and_unknown_keys_are_named():
    config = _plan().to_config()
    del config["lora-seed"], config["local-eval"]
    with pytest.raises(ConfigError, match="missing key.*lora-seed, local-eval"):
        RoundPlan.from_config(config)
    config = {**_plan().to_config(), "lora-rnak": 4}
    with pytest.raises(ConfigError, match="unknown key.*lora-rnak"):
        RoundPlan.from_config(config)


def test_the_run_config_is_checked_by_the_contract_too():
    # FlConfig leaves the checks of the keys it sends to RoundPlan: one rule, both sides.
    with pytest.raises(ConfigError, match="`lr`"):
        FlConfig.from_run_config({"lr": -0.1})
    with pytest.raises(ConfigError, match="`lora-rank`"):
        FlConfig.from_run_config({"lora-rank": -1})
    with pytest.raises(ConfigError, match="`client-threads`"):
        FlConfig.from_run_config({"client-threads": -1})
