"""The Flower round contract: what the server asks of a node in a round, written out once.

The ServerApp builds a `RoundPlan` from its run config (`FlConfig.round_plan`) and sends
`plan.to_config()` as the round's ConfigRecord; the node's ClientApp reads it back with
`RoundPlan.from_config(record)`, which refuses a missing, unknown or bad key by name. Keys
are kebab-case, as everywhere in Flower. `server-round` is Flower's own key: its strategies
overwrite it in the train/evaluate config of every round; the hand-over sets it itself.
Flower's central-DP wrappers add `clipping_norm` to the train config (their client-side
clipping mods read it there); it is Flower's, not the plan's, and `from_config` skips it.

Plain dicts in and out: no Flower types here, so `common` stays importable without flwr.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.config import from_dict, kebab, snake_keys
from common.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftModel

WHERE = "round config"
# Keys Flower's own strategy wrappers add to the round's ConfigRecord (not ours to parse).
FLOWER_KEYS = ("clipping_norm",)
LR_DECAYS = ("none", "cosine")
DP_MODES = ("off", "client-fixed", "client-adaptive", "server-fixed", "server-adaptive")

ConfigValue = bool | int | float | str


@dataclass(frozen=True)
class RoundPlan:
    """One round's instructions to a node (every key is sent every round).

    lora-rank / lora-alpha: 0 means the model config's own values. freeze-a: FFA-LoRA (A
    stays at its seeded init, only B travels); lora-a-digest is the server's hash of that A,
    which the node checks before training. max-steps 0: no cap on local optimiser steps.
    dp: the run's DP mode; with client-side DP the node clips its change (Flower's clipping
    mods) and with any DP it reports a uniform weight (`num-examples` = 1), because the
    noise is calibrated to a plain mean. update-clip-norm > 0: the node scales its change
    down to this L2 norm before sending (under SecAgg+ the server cannot reject it later).
    lr-decay: "none" keeps `lr` every round; "cosine" scales round r's `lr` by
    0.5 * (1 + cos(pi * (r - 1) / num-server-rounds)), so the last rounds take small steps
    (label-free rounds peak early and then drift: docs/label-free.md). Each round's local
    training decays its own lr to 0 as well; this sets the round's peak.
    share-memories: the server pools label-free nodes' tracklet memories and forwards the
    others' to each node that shares its own (common/memories.py); a node shares only if
    its own config says `share-memories` too.
    """

    server_round: int
    num_server_rounds: int
    model: str
    strategy: str
    lora_rank: int
    lora_alpha: float
    lora_seed: int
    freeze_a: bool
    lora_a_digest: str
    local_epochs: int
    lr: float
    batch_size: int
    max_steps: int
    proximal_mu: float
    seed: int
    local_eval: bool
    dp: str = "off"
    update_clip_norm: float = 0.0
    lr_decay: str = "none"
    share_memories: bool = False

    def __post_init__(self) -> None:
        if self.server_round < 0:
            raise ConfigError(f"`server-round` must be >= 0, got {self.server_round}")
        if self.num_server_rounds < 1:
            raise ConfigError(f"`num-server-rounds` must be >= 1, got {self.num_server_rounds}")
        if not self.model.strip():
            raise ConfigError("`model` is empty: name a model config, directory or hf:<id>")
        if self.lora_rank < 0:
            raise ConfigError(f"`lora-rank` must be >= 0, got {self.lora_rank}")
        for key in ("lora_alpha", "proximal_mu"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"`{kebab(key)}` must be a number >= 0, got {value}")
        if self.local_epochs < 1 or self.batch_size < 2 or self.max_steps < 0:
            raise ConfigError(
                "`local-epochs` must be >= 1, `batch-size` >= 2 and `max-steps` >= 0 "
                f"(got {self.local_epochs}, {self.batch_size}, {self.max_steps})"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"`lr` must be a positive number, got {self.lr}")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"`lr-decay` must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.dp not in DP_MODES:
            raise ConfigError(f"`dp` must be one of {DP_MODES}, got {self.dp!r}")
        if not (math.isfinite(self.update_clip_norm) and self.update_clip_norm >= 0):
            raise ConfigError(
                f"`update-clip-norm` must be a number >= 0, got {self.update_clip_norm}"
            )

    # ------------------------------------------------------------------ the wire
    def to_config(self) -> dict[str, ConfigValue]:
        """The round's ConfigRecord content: every field, kebab-case keys, floats as floats."""
        hints = typing.get_type_hints(type(self))
        return {
            kebab(f.name): _wire(hints[f.name], getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundPlan:
        """Parse a round's ConfigRecord; a missing, unknown or ill-typed key is a ConfigError."""
        data = snake_keys({k: v for k, v in dict(config).items() if k not in FLOWER_KEYS})
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [kebab(name) for name in names if name not in data]
        if missing and set(data) <= set(names):  # unknown keys first: from_dict names them
            raise ConfigError(
                f"{WHERE}: missing key(s) {', '.join(missing)}; the server sends all of them "
                "(is it running another version of fedretrieve?)"
            )
        try:
            return from_dict(cls, data, WHERE)
        except ConfigError as err:  # __post_init__'s messages name the key, not the record
            message = str(err)
            if message.startswith(WHERE):
                raise
            raise ConfigError(f"{WHERE}: {message}") from None

    # ------------------------------------------------------------------ what it implies
    @property
    def uniform_weights(self) -> bool:
        """Under DP every node weighs the same: the noise is calibrated to a plain mean."""
        return self.dp != "off"

    @property
    def round_lr(self) -> float:
        """This round's peak learning rate under `lr-decay`."""
        if self.lr_decay == "none":
            return self.lr
        progress = (max(1, self.server_round) - 1) / self.num_server_rounds
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def final(self) -> bool:
        return self.server_round >= self.num_server_rounds

    @property
    def adapter_key(self) -> tuple:
        """What fixes the adapter's structure and init: equal keys, identical fresh adapters."""
        return (self.model, self.lora_rank, self.lora_alpha, self.lora_seed, self.freeze_a)

    def create_adapter(self) -> PeftModel:
        """The base model with this plan's fresh seeded adapter (server and nodes alike)."""
        from common.factory import create_lora_model

        return create_lora_model(
            self.model,
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            init_seed=self.lora_seed,
            freeze_a=self.freeze_a,
        )


def _wire(hint: Any, value: Any) -> ConfigValue:
    return float(value) if hint is float else value
