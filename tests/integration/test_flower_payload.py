"""What a node sends and what it hands over, through the real ClientApp (no Ray, no network).

The ClientApp is called the way a SuperNode calls it (Message + Context); the ServerApp's
own config builds the round plan and the global adapter from it, so both sides of the
contract are the shipped code.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from common.errors import AdapterMismatch, DatasetError
from common.factory import create_model
from common.lora import get_adapter_state, is_lora_a, lora_a_digest, lora_parameter_count
from common.round_plan import RoundPlan
from edge_node.fl.client_app import TRAINERS, build_client_app
from edge_node.fl.task import NodeFlSettings, NodeTrainer, TrainerRegistry
from edge_node.serving.hotswap import latest_adapter
from server.fl.run_config import FlConfig
from server.fl.server_app import payload_keys
from server.fl.strategies import UpdateSpec, build_strategy, check_update

# Where the trainers of the ClientApp pickled below live (like client_app.TRAINERS).
APP_TRAINERS = TrainerRegistry(f"{__name__}:APP_TRAINERS")


def _setup(data: Path, tmp_path: Path, strategy: str):
    cfg = FlConfig(
        model="tiny", strategy=strategy, max_steps=2, batch_size=8, out_dir=str(tmp_path / "out")
    )
    peft = cfg.round_plan().create_adapter()
    template = get_adapter_state(peft)
    keys = payload_keys(template, cfg.freeze_a)
    initial = ArrayRecord({k: template[k] for k in keys})
    digest = lora_a_digest(template)
    return data, cfg, peft, template, initial, digest


def sent_config(cfg: FlConfig, digest: str, server_round: int = 0) -> ConfigRecord:
    """The ConfigRecord the ServerApp sends (Flower's strategy sets `server-round`)."""
    return ConfigRecord(cfg.round_plan(digest, server_round=server_round).to_config())


def _message(content: RecordDict, message_type: str) -> Message:
    meta = Metadata(
        run_id=7,
        message_id="m1",
        src_node_id=0,
        dst_node_id=42,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    return Message(content, metadata=meta)


def _context(node_config: dict) -> Context:
    return Context(run_id=7, node_id=42, node_config=node_config, state=RecordDict(), run_config={})


@pytest.mark.parametrize("strategy", ["fedavg", "ffa"])
def test_train_reply_carries_adapter_tensors_only(tmp_path, tiny_dataset, strategy):
    data, cfg, peft, template, initial, digest = _setup(tiny_dataset, tmp_path, strategy)
    config = sent_config(cfg, digest)
    config["server-round"] = 1
    app = build_client_app()
    msg = _message(RecordDict({"arrays": initial, "config": config}), "train")
    reply = app(msg, _context({"data-path": str(data), "node-id": "node0", "threads": 1}))

    assert not reply.has_error(), reply.error
    (arrays,) = reply.content.array_records.values()
    keys = list(arrays.keys())
    assert set(keys) == set(initial.keys())
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)  # LoRA keys and nothing else
    if strategy == "ffa":
        assert all(".lora_B." in k for k in keys)
        assert not any(is_lora_a(k) for k in keys)
    sent = sum(a.numpy().nbytes for a in arrays.values())
    lora_b = sum(v.numel() for k, v in template.items() if ".lora_B." in k)
    expected = lora_parameter_count(peft) if strategy == "fedavg" else lora_b
    assert sent == expected * 4 == UpdateSpec.from_arrays(initial).nbytes
    assert sent < 0.01 * create_model("tiny").num_parameters() * 4

    metrics = next(iter(reply.content.metric_records.values()))
    assert metrics["num-examples"] > 0 and "local-r1" in metrics
    trained = arrays.to_torch_state_dict()
    assert any(not torch.equal(trained[k], template[k]) for k in keys)  # it did train
    # and the server's gate accepts it
    strategy_obj = build_strategy(cfg, UpdateSpec.from_arrays(initial))
    strategy_obj.begin_round(1, initial)
    check_update(arrays, strategy_obj.spec, strategy_obj._global, max_norm=cfg.max_update_norm)


def test_ffa_node_refuses_a_different_frozen_a(tmp_path, tiny_dataset):
    data, cfg, _, _, initial, digest = _setup(tiny_dataset, tmp_path, "ffa")
    plan = RoundPlan.from_config({**sent_config(cfg, "0" * 64), "server-round": 1})
    settings = NodeFlSettings.from_configs({"data-path": str(data), "node-id": "node1"}, {})
    with pytest.raises(AdapterMismatch, match="frozen A"):
        NodeTrainer().train_round(settings, plan, initial.to_torch_state_dict())
    good = RoundPlan.from_config({**sent_config(cfg, digest), "server-round": 1})
    assert good.freeze_a and good.final is False


def test_a_node_without_data_raises_a_named_error(tmp_path, tiny_dataset):
    # The Flower runtime turns this into an error reply; the server logs it and the round
    # goes on with the other nodes (tests/server/test_strategies.py, deployment test).
    _, cfg, _, _, initial, digest = _setup(tiny_dataset, tmp_path, "ffa")
    config = sent_config(cfg, digest)
    config["server-round"] = 1
    msg = _message(RecordDict({"arrays": initial, "config": config}), "train")
    with pytest.raises(DatasetError, match="missing"):
        build_client_app()(msg, _context({"data-path": str(tmp_path / "missing")}))


def test_handover_writes_a_loadable_adapter_the_daemon_picks(tmp_path, tiny_dataset):
    data, cfg, _, _, initial, digest = _setup(tiny_dataset, tmp_path, "ffa")
    rng = np.random.default_rng(0)
    final = {k: torch.from_numpy(rng.normal(0, 0.01, v.shape).astype(np.float32))
             for k, v in initial.to_torch_state_dict().items()}  # fmt: skip
    config = sent_config(cfg, digest)
    config["server-round"] = cfg.num_server_rounds
    adapter_dir = tmp_path / "adapters"
    msg = _message(
        RecordDict({"arrays": ArrayRecord(final), "config": config}), "evaluate.handover"
    )
    reply = build_client_app()(
        msg, _context({"data-path": str(data), "node-id": "cam-3", "adapter-dir": str(adapter_dir)})
    )
    assert not reply.has_error(), reply.error
    info = reply.content.config_records["node"]
    assert info["node-name"] == "cam-3"
    assert Path(info["adapter-path"]) == adapter_dir / "federated"
    candidate = latest_adapter(adapter_dir)  # the node daemon's own discovery rule
    assert candidate is not None and candidate.path == adapter_dir / "federated"
    assert candidate.round == cfg.num_server_rounds
    model = create_model("tiny", adapter=adapter_dir / "federated")
    assert model.version == info["model-version"]


def test_node_settings_prefer_the_node_config(tmp_path):
    run_config = {"data-path": "/sim/data", "client-threads": 1, "out-dir": str(tmp_path)}
    jetson = NodeFlSettings.from_configs(
        {"data-path": "/data/gallery", "node-id": "gate-3", "threads": 6, "adapter-dir": "/a"},
        run_config,
    )
    assert (jetson.data_path, jetson.threads, jetson.node_name) == (
        Path("/data/gallery"),
        6,
        "gate-3",
    )
    assert jetson.partition is None and jetson.sim_out_dir is None
    assert NodeTrainer().handover_dir(jetson) == Path("/a/federated")
    virtual = NodeFlSettings.from_configs({"partition-id": 1, "num-partitions": 4}, run_config)
    assert virtual.data_path == Path("/sim/data") and virtual.partition == (1, 4)
    assert virtual.threads == 1 and virtual.sim_out_dir == tmp_path


def test_pickled_trainer_is_the_process_trainer():
    """Flower's Ray backend pickles the ClientApp for every message: the trainer (and its
    model, image and caption caches) must come out as the process's instance, not a copy."""
    trainer = TRAINERS.create()
    trainer._data[("marker",)] = "cached"
    clone = pickle.loads(pickle.dumps(trainer))
    assert clone is trainer
    assert clone._data[("marker",)] == "cached"
    other = TRAINERS.create()
    assert other.key != trainer.key  # two apps in one process stay separate
    assert pickle.loads(pickle.dumps(other)) is other and not other._data
    with pytest.raises(pickle.PicklingError, match="TrainerRegistry"):
        pickle.dumps(NodeTrainer())  # no registry: it would travel as an empty copy
    with pytest.raises(pickle.PicklingError, match="TrainerRegistry"):
        pickle.dumps(TrainerRegistry("edge_node.fl.client_app:NOWHERE").create())


def test_a_fresh_process_keeps_one_trainer_per_key_across_messages(tmp_path):
    """What a Ray actor does: unpickle the same trainer for every message of the run."""
    import subprocess
    import sys

    trainer = TRAINERS.create()
    (tmp_path / "trainer.pkl").write_bytes(pickle.dumps(trainer))
    script = (
        "import pickle, sys\n"
        "from edge_node.fl.client_app import TRAINERS\n"
        "blob = open(sys.argv[1], 'rb').read()\n"
        "first, second = pickle.loads(blob), pickle.loads(blob)\n"
        "first._data['x'] = 1\n"
        "assert second is first and second._data == {'x': 1}, 'copies'\n"
        "assert first.key == sys.argv[2] and first.registry is TRAINERS\n"
        "assert sys.argv[2] in TRAINERS\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "trainer.pkl"), trainer.key],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_client_app_pickled_per_message_reuses_its_trainer(tmp_path, tiny_dataset):
    """The whole ClientApp through Ray's own cloudpickle: the copy trains in the caches of
    the process's trainer, so round 2 does not rebuild the model (round 37 s -> 7.3 s)."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    data, cfg, _, _, initial, digest = _setup(tiny_dataset, tmp_path, "ffa")
    app = build_client_app(trainers=APP_TRAINERS)
    (trainer,) = APP_TRAINERS
    node = _context({"data-path": str(data), "node-id": "node0", "threads": 1})
    models = []
    for server_round in (1, 2):
        config = sent_config(cfg, digest, server_round)
        msg = _message(RecordDict({"arrays": initial, "config": config}), "train")
        reply = cloudpickle.loads(cloudpickle.dumps(app))(msg, node)
        assert not reply.has_error(), reply.error
        models.append(trainer._model)
    assert models[0] is not None and models[1] is models[0]
    assert len(trainer._data) == 1 and len(trainer._banks) == 1
