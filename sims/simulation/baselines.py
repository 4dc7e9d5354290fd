"""Baselines the federated result is judged against, on the same split and budget.

local-only: each node fine-tunes the same LoRA alone on its own cameras and is evaluated
on the whole test gallery (what a site gets without federation). centralised: one LoRA on
the pooled training data of every node: the upper bound federated learning may not see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.camera_norm import CameraNorm
from common.datasets import Record
from common.evaluate import evaluate
from common.factory import create_model
from common.lora import attach_lora
from common.metrics import METRIC_KEYS
from common.train import ImageBank, TextFeatureCache, TrainConfig, train


def fine_tune_and_evaluate(
    base_spec: str,
    train_recs: Sequence[Record],
    test_recs: Sequence[Record],
    train_kwargs: Mapping,
    text_cache: TextFeatureCache,
    test_bank: ImageBank,
    desc: str,
    train_norm: CameraNorm | None = None,
) -> dict:
    """`train_norm`: train on crops normalised per camera (then `test_bank` should be too)."""
    model = create_model(base_spec)
    bank = ImageBank(train_recs, model.preprocess, train_norm) if train_norm else None
    peft_model = attach_lora(model)
    cfg = TrainConfig(**train_kwargs)
    train(peft_model, train_recs, cfg, text_cache=text_cache, desc=desc, bank=bank)
    return evaluate(peft_model, test_recs, text_cache=text_cache, bank=test_bank)


def local_only(
    base_spec: str,
    nodes: Mapping[str, Sequence[Record]],
    test_recs: Sequence[Record],
    train_kwargs: Mapping,
    text_cache: TextFeatureCache,
    test_bank: ImageBank,
    train_norm: CameraNorm | None = None,
) -> dict:
    """Per node metrics, their mean, and the best node (by Rank-1)."""
    per_node = {
        node: fine_tune_and_evaluate(
            base_spec,
            recs,
            test_recs,
            train_kwargs,
            text_cache,
            test_bank,
            f"local {node}",
            train_norm,
        )
        for node, recs in nodes.items()
    }
    mean = {k: sum(m[k] for m in per_node.values()) / len(per_node) for k in METRIC_KEYS}
    best_node = max(per_node, key=lambda n: per_node[n]["R1"])
    return {
        "per_node": {n: {k: round(m[k], 2) for k in METRIC_KEYS} for n, m in per_node.items()},
        "mean": mean,
        "best": per_node[best_node],
        "best_node": best_node,
    }


def centralized(
    base_spec: str,
    train_recs: Sequence[Record],
    test_recs: Sequence[Record],
    train_kwargs: Mapping,
    text_cache: TextFeatureCache,
    test_bank: ImageBank,
    train_norm: CameraNorm | None = None,
) -> dict:
    return fine_tune_and_evaluate(
        base_spec, train_recs, test_recs, train_kwargs, text_cache, test_bank, "centralised",
        train_norm,
    )  # fmt: skip
