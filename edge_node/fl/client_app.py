"""The Flower ClientApp of an edge node: Message in, `task` call, Message out.

Three handlers:
- `train`: load the global adapter, fine-tune it on the node's captioned crops (or
  label-free on its uncaptioned ones), reply with the adapter arrays the server sent (LoRA
  tensors only; B only under FFA-LoRA), plus `num-examples`, the training loss and local
  Rank-1/mAP on the node's held-out split. A label-free node with `share-memories` on
  (its own config and the round plan) also replies with its tracklet memories and reads
  the other nodes' from the message (common/memories.py).
- `evaluate`: local retrieval metrics of the global adapter.
- `evaluate.handover`: after the last round the ServerApp sends the final global adapter
  to every node; it is written atomically into the node's `adapter-dir`, where the node
  daemon picks it up and hot-swaps it (docs/federated.md).

Every message passes `edge_node.fl.privacy.privacy_mod` first: SecAgg+ masking when the
server runs secure aggregation, Flower's DP clipping mods when the round plan asks for
client-side DP (docs/privacy.md).

The node's data comes from `context.node_config` (`flower-supernode --node-config`); no
image or caption ever goes into a reply, and no embedding unless the node shares memories.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.memories import REPLY_RECORD, SHARED_RECORD, from_record, to_record
from common.round_plan import RoundPlan
from edge_node.fl.privacy import privacy_mod
from edge_node.fl.task import NodeFlSettings, TrainerRegistry

ARRAYS, CONFIG, METRICS, NODE = "arrays", "config", "metrics", "node"
HANDOVER_ACTION = "handover"

# This process's trainers (model, image and caption caches), as long as the process lives.
# A ClientApp that Flower pickles per message finds its trainer here again on arrival.
TRAINERS = TrainerRegistry(f"{__name__}:TRAINERS")


def build_client_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    trainers: TrainerRegistry = TRAINERS,
    mods: Sequence[Callable] = (),
) -> ClientApp:
    """A ClientApp with its own trainer in `trainers`; `overrides` stand in for run-config
    keys in in-process simulations; `mods` run before `privacy_mod` (outermost first)."""
    app = ClientApp(mods=[*mods, privacy_mod])
    trainer = trainers.create()  # caches model and images across rounds and messages
    extra = dict(overrides or {})

    def prepare(msg: Message, context: Context):
        settings = NodeFlSettings.from_configs(
            context.node_config, {**dict(context.run_config), **extra}
        )
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        plan = RoundPlan.from_config(msg.content[CONFIG])
        state = msg.content[ARRAYS].to_torch_state_dict()
        return settings, plan, state

    def reply(msg: Message, name: str, metrics: dict, arrays: ArrayRecord | None = None):
        content = RecordDict(
            {METRICS: MetricRecord(metrics), NODE: ConfigRecord({"node-name": name})}
        )
        if arrays is not None:
            content[ARRAYS] = arrays
        return Message(content=content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings, plan, state = prepare(msg, context)
        shared = None
        if SHARED_RECORD in msg.content.array_records:
            record = msg.content.array_records[SHARED_RECORD]
            shared = from_record(record, where="the server's shared memories")
        update = trainer.train_round(settings, plan, state, shared)
        out = reply(msg, trainer.data(settings).name, update.metrics, ArrayRecord(update.payload))
        if update.memories is not None:
            out.content[REPLY_RECORD] = to_record(update.memories)
        return out

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings, plan, state = prepare(msg, context)
        metrics = trainer.evaluate_round(settings, plan, state)
        return reply(msg, trainer.data(settings).name, metrics)

    @app.evaluate(HANDOVER_ACTION)
    def handover(msg: Message, context: Context) -> Message:
        settings, plan, state = prepare(msg, context)
        path, version = trainer.hand_over(settings, plan, state, run_id=context.run_id)
        name = settings.node_name or (
            trainer.data(settings).name if settings.partition else str(context.node_id)
        )
        content = RecordDict(
            {
                METRICS: MetricRecord({"num-examples": 1, "written": int(path is not None)}),
                NODE: ConfigRecord(
                    {
                        "node-name": name,
                        "adapter-path": str(path or ""),
                        "model-version": version,
                    }
                ),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


app = build_client_app()
