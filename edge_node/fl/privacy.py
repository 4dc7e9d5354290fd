"""The node's half of private training: Flower's SecAgg+ and DP clipping mods, chosen per
message, and the checks a node makes on its own update before it leaves.

`privacy_mod` is the ClientApp's one mod. For a TRAIN message it picks:
- SecAgg+ (the message carries Flower's `secaggplus_configs` record): Flower's
  `secaggplus_mod` runs the protocol; in its masked-vector stage it calls `_to_fitres`,
  which hides the SecAgg+ record from the inner chain, runs it, and hands `secaggplus_mod`
  the reply in the legacy FitRes shape it reads (parameters in the order of the global
  arrays the server sent, `num-examples` as the weight, the numeric metrics and the node
  name as FitRes metrics). `secaggplus_mod` then quantizes, masks and clears the arrays.
- client-side DP (the round plan's `dp` is client-fixed / client-adaptive): Flower's
  `fixedclipping_mod` / `adaptiveclipping_mod` clip the change from the global adapter to
  the `clipping_norm` Flower's server wrapper put in the round config, inside the SecAgg+
  layer, so clipping happens before masking.
Evaluation and hand-over messages pass straight through.

`guard_update` (called by the task before any mod sees the update) moves what the server's
clear-text gate checks to the node itself: the same keys, shapes and dtypes as the global
adapter, finite values, and the change scaled down to `update-clip-norm` when the plan sets
one (under SecAgg+ the server cannot reject an oversized update, so the node bounds it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from common.errors import AdapterMismatch

SECAGG_CONFIGS = "secaggplus_configs"  # flwr.common.secure_aggregation RECORD_KEY_CONFIGS
CONFIG, ARRAYS, METRICS, NODE = "config", "arrays", "metrics", "node"
NODE_NAME_METRIC = "node-name"

log = logging.getLogger("flwr").getChild(__name__)


def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Route a TRAIN message through SecAgg+ and/or DP clipping as the server asked."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        def masked_stage(inner_msg: Message, inner_ctxt: Context) -> Message:
            return _to_fitres(inner_msg, inner_ctxt, _with_clipping(call_next))

        return secaggplus_mod(msg, ctxt, masked_stage)
    return _with_clipping(call_next)(msg, ctxt)


def _with_clipping(call_next: ClientAppCallable) -> ClientAppCallable:
    def run(msg: Message, ctxt: Context) -> Message:
        config = msg.content.config_records.get(CONFIG)
        mode = str(config.get("dp", "off")) if config is not None else "off"
        if mode == "client-fixed":
            from flwr.clientapp.mod import fixedclipping_mod

            return fixedclipping_mod(msg, ctxt, call_next)
        if mode == "client-adaptive":
            from flwr.clientapp.mod import adaptiveclipping_mod

            return adaptiveclipping_mod(msg, ctxt, call_next)
        return call_next(msg, ctxt)

    return run


def _to_fitres(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """The masked-vector stage: our reply in the FitRes shape `secaggplus_mod` reads."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    del msg.content[SECAGG_CONFIGS]  # read already by secaggplus_mod; not for the inner mods
    plan = msg.content.config_records.get(CONFIG) or {}
    log.info("SecAgg+ round %s: training, then masking the update", plan.get("server-round"))
    order = list(msg.content.array_records[ARRAYS].keys())
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    (arrays,) = out.content.array_records.values()
    if list(arrays.keys()) != order:
        raise AdapterMismatch("the update's keys differ from the global adapter's")
    (metrics,) = out.content.metric_records.values()
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    node = out.content.config_records.get(NODE)
    if node is not None and node.get("node-name"):
        numbers[NODE_NAME_METRIC] = str(node["node-name"])
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([arrays[k].numpy() for k in order]),
        num_examples=int(metrics["num-examples"]),
        metrics=numbers,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def guard_update(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    clip_norm: float = 0.0,
) -> tuple[dict[str, torch.Tensor], float]:
    """The update as the node may send it, and the L2 norm of its change before clipping.

    Refuses (AdapterMismatch) keys, shapes or dtypes other than the global adapter's and
    non-finite values; scales the change from `reference` down to `clip_norm` when > 0.
    """
    if list(update) != list(reference):
        raise AdapterMismatch("the update's keys differ from the global adapter's")
    total = 0.0
    for key, value in update.items():
        ref = reference[key]
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            raise AdapterMismatch(
                f"{key}: {tuple(value.shape)} {value.dtype}, the global adapter has "
                f"{tuple(ref.shape)} {ref.dtype}"
            )
        if not torch.isfinite(value).all():
            raise AdapterMismatch(f"{key} contains NaN or inf after training; not sent")
        total += float((value.double() - ref.double()).square().sum())
    norm = math.sqrt(total)
    if not clip_norm or norm <= clip_norm:
        return dict(update), norm
    factor = clip_norm / norm
    return {
        k: (reference[k].double() + factor * (v.double() - reference[k].double())).to(v.dtype)
        for k, v in update.items()
    }, norm
