"""The federated run's configuration: `[tool.flwr.app.config]` parsed once, validated, frozen.

Flower hands the ServerApp `context.run_config` (kebab-case keys from pyproject.toml plus
`flwr run --run-config` overrides). It is read here, once, at the top of the ServerApp; a
typo or an impossible combination stops the run before any node is contacted, with a
message naming the key. What the nodes need for a round travels to them in the round's
ConfigRecord, built by `FlConfig.round_plan` (the contract, `common.round_plan.RoundPlan`,
validates its own keys), so the nodes never read server-side settings themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.config import from_dict, kebab, snake_keys
from common.errors import ConfigError
from common.round_plan import RoundPlan

STRATEGIES = ("fedavg", "ffa", "robust", "random-walk")
ROBUST_AGGREGATORS = ("trimmed", "median")
DP_MODES = ("off", "client-fixed", "client-adaptive", "server-fixed", "server-adaptive")


@dataclass(frozen=True)
class FlConfig:
    """Everything a federated run needs (keys in kebab-case in TOML / --run-config).

    strategy: fedavg (FedIT: weighted FedAvg of A and B), ffa (FFA-LoRA: A frozen at the
        shared seeded init, only B travels, aggregation exact), robust (FedIT payload, every
        update's change clipped to `clip-norm`, then FedTrimmedAvg or FedMedian),
        random-walk (one node per round in a seeded shuffled order; its update is the next
        global adapter, no averaging: seed 004's alternative).
    max-update-norm: an update whose change from the round's global adapter has a larger L2
        norm is rejected (0 disables the bound). Catches scaled/poisoned updates.
    min-nodes: nodes that must be connected before a round starts and nodes sampled.
    min-updates: valid updates needed to aggregate; with fewer the global stays unchanged.
    round-timeout: seconds the server waits for replies; late nodes are left out of the round.
    data-path: dataset used by simulated nodes (each takes its own `node` partition) and,
        unless `eval-data` says otherwise, for the server's held-out evaluation.
    eval-split: split of the held-out set ("" disables server-side evaluation).
    gallery-root: simulation only: the i-th simulated node trains on the gallery of the node
        daemon whose data dir is `<gallery-root>/<i-th node id, sorted>/data` instead of its
        `data-path` partition (sims/simulation/train_galleries.py); `data-path` then only
        supplies the hidden person ids the pseudo-label figures are measured against.
    lora-rank / lora-alpha: 0 means the model config's own values.
    max-steps: cap on local optimiser steps per round (0: no cap), for quick runs.
    lr-decay: none | cosine: the round's peak lr across rounds (common/round_plan.py).
    text-cache: a saved `TextFeatureCache` of the base model (captions already encoded by
        the frozen text tower); the server and simulated nodes start from it. Speed only.
    camera-norm: nodes train on their crops normalised per camera (common/camera_norm.py,
        from their own crops), as a node daemon with `[camera-norm] enabled` serves them,
        and the server evaluates on its held-out gallery normalised the same way. A
        deployed node sets it in its own --node-config as well.
    label-free / label-free-nodes: node-side, read by simulated nodes only (a deployed node
        sets `label-free` in its own --node-config): train without captions, on
        pseudo-identities mined from the crops (docs/label-free.md); every node, or those
        named (comma list); `label-free-anchor` (base | round), its weight
        `label-free-anchor-weight`, `label-free-camera` (weight of the per-camera mean
        alignment), `label-free-text` (weight of the pseudo-captions,
        common/pseudo_captions.py) and `label-free-cluster` (weight of the centroid
        memory) tune their loss (common/self_train.py),
        `label-free-link-cos` the cross-camera mutual top-1 threshold and
        `label-free-link-window-s` its space-time window (edge_node/fl/mining.py).
    share-memories: label-free nodes that also set it (node config; simulated nodes read
        it here) add their tracklet memories to their train replies, and the server
        forwards the others' to each of them the next round (common/memories.py); off by
        default, refused with `dp` and `secure-aggregation` (the memories would travel in
        the clear beside a protected update). `label-free-shared-cos`: the node's threshold
        for linking to them.

    Privacy (docs/privacy.md):
    secure-aggregation: Flower's SecAgg+ (the server learns only the weighted average of
        the sampled nodes' updates); needs >= 3 sampled nodes and a strategy that averages
        (fedavg or ffa: a trimmed mean or a median needs the individual updates).
    num-shares / reconstruction-threshold: SecAgg+'s key shares per node and how many of
        them rebuild a dropped node's mask (0: all sampled nodes / about 2/3 of the shares).
        A round survives as long as every node keeps `reconstruction-threshold` live
        neighbours; fewer than that many colluding parties learn nothing of one update.
    secagg-clipping-range / secagg-quantization-range / secagg-modulus-range /
        secagg-max-weight: SecAgg+'s fixed-point encoding (values clipped to +-range,
        2**22 levels, sums mod 2**32; a node's `num-examples` weight is capped by max-weight).
    dp: off | client-fixed | client-adaptive | server-fixed | server-adaptive, Flower's
        central-DP wrappers; client-* clip on the node before anything leaves it (and so
        compose with SecAgg+), server-* clip on the server (they need the individual updates).
    dp-noise-multiplier: z, Gaussian noise of std z * clip / sampled nodes on the average.
    dp-clip-norm: the L2 bound on each node's change (the initial one when adaptive).
    dp-delta: the delta epsilon is stated at. dp-target-quantile / dp-clip-lr /
        dp-clipped-count-stddev: adaptive clipping (0: Flower's default, sampled nodes / 20).
    dp-amplification: count subsampling (q = fraction-train) as Poisson sampling in the
        accountant; off by default because Flower samples a fixed number of nodes, and
        without it epsilon is the (larger) q = 1 figure, valid whatever was sampled.
    dp-max-epsilon: stop before a round that would take epsilon past it (0: no limit).
    """

    num_server_rounds: int = 3
    strategy: str = "ffa"
    robust_aggregator: str = "trimmed"
    trim_beta: float = 0.2
    clip_norm: float = 1.0
    max_update_norm: float = 100.0
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    min_updates: int = 1
    round_timeout: float = 3600.0
    local_epochs: int = 1
    lr: float = 0.002
    lr_decay: str = "none"
    batch_size: int = 32
    max_steps: int = 0
    proximal_mu: float = 0.0
    local_eval: bool = True
    model: str = "default"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_seed: int = 0
    seed: int = 0
    data_path: str = ""
    gallery_root: str = ""
    eval_data: str = ""
    eval_split: str = "test"
    out_dir: str = "runs/fl"
    client_threads: int = 1
    server_threads: int = 0
    text_cache: str = ""
    camera_norm: bool = False
    label_free: bool = False
    label_free_nodes: str = ""
    label_free_anchor: str = "base"
    label_free_anchor_weight: float = 1.0
    label_free_camera: float = 0.0
    label_free_text: float = 0.0
    label_free_cluster: float = 0.0
    label_free_link_cos: float = 0.7
    label_free_link_window_s: float = 0.0
    label_free_shared_cos: float = 0.7
    share_memories: bool = False
    secure_aggregation: bool = False
    num_shares: int = 0
    reconstruction_threshold: int = 0
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_modulus_range: int = 4294967296
    secagg_max_weight: float = 1000.0
    dp: str = "off"
    dp_noise_multiplier: float = 1.0
    dp_clip_norm: float = 0.1
    dp_delta: float = 1e-5
    dp_target_quantile: float = 0.5
    dp_clip_lr: float = 0.2
    dp_clipped_count_stddev: float = 0.0
    dp_amplification: bool = False
    dp_max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        self.round_plan()  # the keys the nodes get are checked by the contract itself
        self._check_privacy()
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"`strategy` must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.robust_aggregator not in ROBUST_AGGREGATORS:
            raise ConfigError(
                f"`robust-aggregator` must be one of {ROBUST_AGGREGATORS}, "
                f"got {self.robust_aggregator!r}"
            )
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"`trim-beta` must be in [0, 0.5), got {self.trim_beta}")
        for key in ("clip_norm", "max_update_norm"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"`{kebab(key)}` must be a number >= 0, got {value}")
        for key in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"`{kebab(key)}` must be in [0, 1], got {value}")
        if self.fraction_train == 0.0:
            raise ConfigError("`fraction-train` is 0: no node would ever train")
        if self.min_nodes < 1 or self.min_updates < 1:
            raise ConfigError(
                f"`min-nodes` and `min-updates` must be >= 1 "
                f"(got {self.min_nodes}, {self.min_updates})"
            )
        if self.min_updates > self.min_nodes:
            raise ConfigError(
                f"`min-updates` ({self.min_updates}) cannot exceed `min-nodes` "
                f"({self.min_nodes}): a round could never aggregate"
            )
        if not self.round_timeout > 0:
            raise ConfigError(f"`round-timeout` must be > 0 seconds, got {self.round_timeout}")
        if self.client_threads < 0 or self.server_threads < 0:
            raise ConfigError(
                "`client-threads` and `server-threads` must be >= 0 "
                f"(got {self.client_threads}, {self.server_threads})"
            )
        if not self.out_dir.strip():
            raise ConfigError("`out-dir` is empty: the global adapters must go somewhere")

    def _check_privacy(self) -> None:
        if self.dp not in DP_MODES:
            raise ConfigError(f"`dp` must be one of {DP_MODES}, got {self.dp!r}")
        for key in ("dp_noise_multiplier", "dp_clipped_count_stddev", "dp_max_epsilon"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"`{kebab(key)}` must be a number >= 0, got {value}")
        for key in ("dp_clip_norm", "dp_clip_lr", "secagg_clipping_range", "secagg_max_weight"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"`{kebab(key)}` must be a number > 0, got {value}")
        if not 0.0 < self.dp_delta < 1.0:
            raise ConfigError(f"`dp-delta` must be in (0, 1), got {self.dp_delta}")
        if not 0.0 <= self.dp_target_quantile <= 1.0:
            raise ConfigError(
                f"`dp-target-quantile` must be in [0, 1], got {self.dp_target_quantile}"
            )
        if self.dp != "off" and self.dp_noise_multiplier == 0:
            raise ConfigError(
                f"`dp` = {self.dp!r} with `dp-noise-multiplier` = 0 adds no noise: no epsilon "
                "could be stated (set a noise multiplier > 0, or `dp` = 'off')"
            )
        if self.dp.endswith("-adaptive") and self.dp_noise_multiplier > 0:
            stddev = self.dp_clipped_count_stddev or self.min_nodes / 20
            if self.dp_noise_multiplier >= 2 * stddev:
                raise ConfigError(
                    f"`dp-noise-multiplier` ({self.dp_noise_multiplier}) must be below twice "
                    f"`dp-clipped-count-stddev` ({stddev:g}; 0 means min-nodes / 20) for "
                    "adaptive clipping: raise `dp-clipped-count-stddev`"
                )
        if self.strategy == "random-walk" and (self.dp != "off" or self.secure_aggregation):
            raise ConfigError(
                "`random-walk` hands one node's update on as the global adapter: DP noise "
                "calibrated to a mean and SecAgg+ (which needs several nodes) do not apply"
            )
        if self.share_memories and (self.dp != "off" or self.secure_aggregation):
            raise ConfigError(
                "`share-memories` sends each node's tracklet memories to the server in the "
                "clear: it cannot sit beside `dp` or `secure-aggregation`, which protect "
                "that node's update (turn one of them off)"
            )
        if self.dp != "off" and self.strategy == "robust":
            raise ConfigError(
                "`dp` needs an averaging strategy (fedavg or ffa): the DP noise is calibrated "
                "to a mean of clipped updates, not to a trimmed mean or a median"
            )
        for key in ("num_shares", "reconstruction_threshold"):
            if getattr(self, key) < 0:
                raise ConfigError(f"`{kebab(key)}` must be >= 0, got {getattr(self, key)}")
        if self.secagg_quantization_range < 2:
            raise ConfigError(
                f"`secagg-quantization-range` must be >= 2, got {self.secagg_quantization_range}"
            )
        mod = self.secagg_modulus_range
        if mod <= self.secagg_quantization_range or mod > 2**32 or mod & (mod - 1):
            raise ConfigError(
                "`secagg-modulus-range` must be a power of 2 above "
                f"`secagg-quantization-range` and at most 2**32, got {mod}"
            )
        if not self.secure_aggregation:
            return
        if self.strategy == "robust":
            raise ConfigError(
                "`secure-aggregation` needs an averaging strategy (fedavg or ffa): the "
                "robust aggregators (trimmed mean, median) need the individual updates"
            )
        if self.dp.startswith("server-"):
            raise ConfigError(
                f"`dp` = {self.dp!r} clips on the server, which needs every update in the "
                "clear; under `secure-aggregation` use 'client-fixed' or 'client-adaptive'"
            )
        if self.min_nodes < 3:
            raise ConfigError(
                f"`secure-aggregation` needs `min-nodes` >= 3 (got {self.min_nodes}): with "
                "two nodes each could subtract its own update from the sum"
            )
        shares, threshold = self.secagg_shares()
        if not 2 <= threshold < shares:
            raise ConfigError(
                f"`reconstruction-threshold` ({threshold}) must be >= 2 and below "
                f"`num-shares` ({shares}): SecAgg+ could not rebuild a dropped node's mask"
            )
        if threshold > self.min_nodes:
            raise ConfigError(
                f"`reconstruction-threshold` ({threshold}) exceeds `min-nodes` "
                f"({self.min_nodes}): no round could be unmasked"
            )

    def secagg_shares(self) -> tuple[int, int]:
        """(num-shares, reconstruction-threshold) with 0s resolved for min-nodes nodes."""
        shares = self.num_shares or self.min_nodes
        threshold = self.reconstruction_threshold or max(2, min(shares - 1, -(-2 * shares // 3)))
        return shares, threshold

    @property
    def client_side_clipping(self) -> float:
        """The L2 bound each node applies to its change before sending (0: the server's gate).

        Under SecAgg+ the server cannot reject an oversized update, so the node clips its
        own change to `max-update-norm` (the bound the clear-text gate enforces).
        """
        return self.max_update_norm if self.secure_aggregation else 0.0

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
    ) -> FlConfig:
        """Parse Flower's run config (kebab-case keys); `overrides` win (in-process runs)."""
        data = dict(run_config)
        data.update(overrides or {})
        return from_dict(cls, snake_keys(data), "run config [tool.flwr.app.config]")

    @property
    def freeze_a(self) -> bool:
        return self.strategy == "ffa"

    def round_plan(self, lora_a_digest: str = "", *, server_round: int = 0) -> RoundPlan:
        """What every node is sent for a round (Flower's strategies set `server-round`)."""
        return RoundPlan(
            server_round=server_round,
            num_server_rounds=self.num_server_rounds,
            model=self.model,
            strategy=self.strategy,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_seed=self.lora_seed,
            freeze_a=self.freeze_a,
            lora_a_digest=lora_a_digest,
            local_epochs=self.local_epochs,
            lr=self.lr,
            lr_decay=self.lr_decay,
            batch_size=self.batch_size,
            max_steps=self.max_steps,
            proximal_mu=self.proximal_mu,
            seed=self.seed,
            local_eval=self.local_eval,
            dp=self.dp,
            update_clip_norm=self.client_side_clipping,
            share_memories=self.share_memories,
        )

    @property
    def eval_source(self) -> Path | None:
        """Dataset for server-side held-out evaluation, or None when disabled."""
        source = self.eval_data or self.data_path
        return Path(source).expanduser() if source and self.eval_split else None

    def to_dict(self) -> dict[str, Any]:
        return {kebab(k): v for k, v in asdict(self).items()}
