"""A label-free round at a node: mine pseudo-identities from the node's own crops, then
train the adapter on them (docs/label-free.md).

Captions are ignored. The round's global model embeds the crops; `edge_node.fl.mining`
links them into tracklets and, across cameras (and, when shared, across nodes), into
pseudo-identities; `common.self_train` trains LoRA on those with an anchor that keeps the
image space aligned with the frozen text tower. `task.NodeTrainer.train_round` calls this
for a node whose config says `label-free`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.datasets import Record
from common.evaluate import embed_records
from common.memories import SharedMemories
from common.pseudo_captions import pseudo_captions, vocabulary
from common.self_train import SelfTrainWeights, self_train
from common.train import ImageBank, TrainConfig, TrainResult, core_model
from edge_node.fl.mining import (
    MiningSettings,
    export_memories,
    label_quality,
    link_tracklets,
    mine_identities,
)


@dataclass(frozen=True)
class LabelFreeRound:
    """What a node's config asks of its label-free rounds (`NodeFlSettings.label_free_round`)."""

    mining: MiningSettings
    weights: SelfTrainWeights
    anchor: str = "base"  # "base": anchor to the base model's embedding; "round": this round's


def train_label_free(
    model,
    records: list[Record],
    cfg: TrainConfig,
    bank: ImageBank,
    how: LabelFreeRound,
    shared: SharedMemories | None = None,
    *,
    share: bool = False,
) -> tuple[TrainResult, dict[str, float], SharedMemories | None]:
    """One label-free round: captions ignored; tracklets and pseudo-identities mined with
    the round's global model (with other nodes' `shared` memories when the server
    forwarded some), then `common.self_train`. With real person ids in the records
    (simulation), the pseudo-labels' quality is reported too. `share`: also return this
    node's memories (mined before training, with the round's model)."""
    t0 = time.perf_counter()
    by_path = {r.image_path: dataclasses.replace(r, captions=()) for r in records}
    crops = [by_path[p] for p in sorted(by_path)]  # embed_records' gallery order
    emb = embed_records(model, crops, bank=bank).gallery
    cams, stamps = [r.camera_id for r in crops], [r.timestamp_ms for r in crops]
    tracklets = link_tracklets(cams, stamps, emb, how.mining)
    mined = mine_identities(tracklets, cams, emb, how.mining, stamps, shared)
    pseudo = mined.local
    keys = None
    if shared is not None and (mined.shared >= 0).any():  # joined: fixed positives
        joined = mined.shared >= 0
        keys = (torch.from_numpy(shared.vectors[joined]), mined.shared[joined].tolist())
    anchors = emb
    if how.anchor == "base":  # fixed across rounds: the text-aligned start
        with model.disable_adapter():
            anchors = embed_records(model, crops, bank=bank).gallery
    captions = None
    if how.weights.text:  # the memories' descriptions, in the round's text space
        slots, core = vocabulary(), core_model(model)
        prompts = core.encode_text([p for s in slots.values() for p in s])
        scale = float(core.logit_scale.exp())
        captions = pseudo_captions(emb, pseudo, prompts, [len(s) for s in slots.values()], scale)
    result = self_train(
        model,
        crops,
        pseudo.tolist(),
        torch.from_numpy(anchors),
        cfg,
        how.weights,
        bank=bank,
        captions=captions,
        keys=keys,
        features=torch.from_numpy(emb),
    )
    own = export_memories(tracklets, cams, stamps, emb) if share else None
    metrics: dict[str, float] = {
        "pl-ids": float(len(np.unique(pseudo))),
        "pl-tracklets": float(len(np.unique(tracklets))),
        # embedding with the round's (and the base) model + tracklets + pseudo-identities
        "pl-seconds": time.perf_counter() - t0 - result.seconds,
    }
    if captions is not None:
        metrics["pc-confidence"] = captions.confidence()
    if shared is not None:  # what the other nodes' memories added
        metrics["mem-received"] = float(len(shared))
        metrics["mem-joined"] = float((mined.shared >= 0).sum())
    if own is not None:
        metrics["mem-sent-bytes"] = float(own.nbytes)
    truth = [r.person_id for r in crops]
    if min(truth) >= 0:  # a simulated node knows the truth; a real site does not
        quality = label_quality(pseudo, truth)
        metrics.update(
            {
                "pl-precision": quality["precision"],
                "pl-recall": quality["recall"],
                "pl-true-ids": float(quality["true_labels"]),
                # share of crops whose tracklet's majority person is theirs
                "pl-tracklet-purity": label_quality(tracklets, truth)["purity"],
            }
        )
    return result, metrics, own
