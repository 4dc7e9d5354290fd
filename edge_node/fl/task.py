"""What a node does in a federated round, with no Flower in sight (STYLE: task modules).

`client_app.py` translates Flower messages to these calls and back. Here: where the node's
data is (`NodeFlSettings`, from the SuperNode's `--node-config`), and `NodeTrainer`, which
loads the global adapter, trains it on the node's captioned crops, evaluates it on the
node's held-out split and hands the final one to the node daemon, as the round's
`common.round_plan.RoundPlan` (the server's ConfigRecord, parsed) says. `TrainerRegistry`
owns a process's trainers, so their caches survive Flower pickling the ClientApp.

Only adapter tensors leave this module: the keys the server sent, nothing else.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.datasets import Record, load_records
from common.errors import AdapterMismatch, ConfigError, DatasetError
from common.memories import SharedMemories
from common.round_plan import RoundPlan

if TYPE_CHECKING:
    from edge_node.fl.label_free import LabelFreeRound

# A child of Flower's logger: these lines show wherever Flower's do (console, `flwr run
# --stream`, `flwr log`), also in the ServerApp/ClientApp subprocesses of the deployment engine.
log = logging.getLogger("flwr").getChild(__name__)

HANDOVER_NAME = "federated"  # sub-directory of adapter-dir the final global adapter goes to


@dataclass(frozen=True)
class NodeFlSettings:
    """Where this node's data is and where the final adapter goes.

    Deployment: from `flower-supernode --node-config "data-path='...' node-id='cam-3'
    adapter-dir='...'"`. Simulation: virtual nodes only get `partition-id` and
    `num-partitions`; the dataset comes from the run config's `data-path` and the
    partition picks the i-th distinct `node` of its records (see `select_partition`).
    """

    data_path: Path
    node_name: str = ""  # records whose `node` equals it; "" = every record in data-path
    # a node daemon's data dir: train on the crops its gallery holds (a deployment's data
    # store, read while the daemon ingests); replaces data-path
    gallery: Path | None = None
    # simulation from galleries: the dataset whose hidden person ids measure pseudo-labels
    truth_path: Path | None = None
    # train on crops normalised per camera (gains + levels from the node's own crops), as the
    # node daemon embeds them with `[camera-norm] enabled`: no train/serve skew
    camera_norm: bool = False
    # train without captions (pseudo-identities mined from the crops, docs/label-free.md):
    # every node (`label-free`), or the nodes named in the run config's `label-free-nodes`
    label_free: bool = False
    label_free_nodes: tuple[str, ...] = ()
    anchor: str = "base"  # label-free: keep crops near the base model's (or "round"'s) embedding
    anchor_weight: float = 1.0  # label-free: weight of that anchor against the SupCon term
    camera_weight: float = 0.0  # label-free: weight of the per-camera mean alignment
    text_weight: float = 0.0  # label-free: weight of the pseudo-caption term
    cluster_weight: float = 0.0  # label-free: weight of the centroid-memory term
    link_cos: float = 0.7  # label-free: mutual top-1 threshold across cameras (> 1: none)
    link_window_s: float = 0.0  # label-free: link only visits this close in time (0: any)
    # label-free: add this node's tracklet memories to its replies when the round plan asks
    # (common/memories.py); the node's own consent, off by default
    share_memories: bool = False
    shared_cos: float = 0.7  # label-free: mutual top-1 threshold to shared memories
    partition: tuple[int, int] | None = None  # (partition-id, num-partitions) in simulation
    adapter_dir: Path | None = None  # the node daemon's watched adapter dir
    sim_out_dir: Path | None = None  # simulation: adapter dirs under OUT/nodes/<node>/
    train_split: str = "train"
    eval_split: str = "test"
    threads: int = 1
    device: str = "cpu"
    text_cache: Path | None = None  # a saved TextFeatureCache of the base model (speed only)

    def __post_init__(self) -> None:
        if self.gallery is None and not str(self.data_path).strip():
            raise ConfigError(
                "node has no data: set `gallery` (the node daemon's data dir) or `data-path` "
                "in --node-config (or the run config's `data-path` in simulation)"
            )
        if self.anchor not in ("base", "round"):
            raise ConfigError(f"`label-free-anchor` must be base or round, got {self.anchor!r}")
        if not self.anchor_weight >= 0:  # also refuses NaN
            raise ConfigError(f"`label-free-anchor-weight` must be >= 0, got {self.anchor_weight}")
        if not self.link_window_s >= 0:
            raise ConfigError(f"`label-free-link-window-s` must be >= 0, got {self.link_window_s}")
        if not -1 <= self.shared_cos <= 1:
            raise ConfigError(f"`label-free-shared-cos` must be in [-1, 1], got {self.shared_cos}")
        if not self.text_weight >= 0:
            raise ConfigError(f"`label-free-text` must be >= 0, got {self.text_weight}")
        if not self.cluster_weight >= 0:
            raise ConfigError(f"`label-free-cluster` must be >= 0, got {self.cluster_weight}")
        if self.threads < 0:
            raise ConfigError(f"`threads` must be >= 0, got {self.threads}")

    def label_free_round(self) -> LabelFreeRound:
        """The mining and training settings of this node's label-free rounds."""
        from common.self_train import SelfTrainWeights
        from edge_node.fl.label_free import LabelFreeRound
        from edge_node.fl.mining import MiningSettings

        mining = MiningSettings(
            link_cos=self.link_cos,
            link_window_ms=int(self.link_window_s * 1000),
            shared_cos=self.shared_cos,
        )
        weights = SelfTrainWeights(
            anchor=self.anchor_weight,
            camera=self.camera_weight,
            text=self.text_weight,
            cluster=self.cluster_weight,
        )
        return LabelFreeRound(mining, weights, self.anchor)

    @classmethod
    def from_configs(
        cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]
    ) -> NodeFlSettings:
        """Node config wins; the run config only fills in what simulation cannot set."""

        def get(key: str, default: Any = None) -> Any:
            if key in node_config:
                return node_config[key]
            return run_config.get(key, default)

        partition = None
        if "partition-id" in node_config:
            partition = (int(node_config["partition-id"]), int(node_config["num-partitions"]))
        adapter_dir = node_config.get("adapter-dir")
        sim_out = run_config.get("out-dir") if partition is not None else None
        gallery = node_config.get("gallery")
        node_name = str(node_config.get("node-id", ""))
        truth_path = None
        data_path = str(get("data-path", "")).strip()
        if partition is not None and run_config.get("gallery-root"):
            node_name = _sim_gallery_node(Path(str(run_config["gallery-root"])), *partition)
            gallery = Path(str(run_config["gallery-root"])) / node_name / "data"
            truth_path = Path(data_path).expanduser() if data_path else None
        return cls(
            data_path=Path(data_path).expanduser() if data_path else Path(""),
            gallery=Path(str(gallery)).expanduser() if gallery else None,
            camera_norm=_flag(get("camera-norm", False)),
            label_free=_flag(get("label-free", False)),
            anchor=str(get("label-free-anchor", "base")),
            anchor_weight=float(get("label-free-anchor-weight", 1.0)),
            camera_weight=float(get("label-free-camera", 0.0)),
            text_weight=float(get("label-free-text", 0.0)),
            cluster_weight=float(get("label-free-cluster", 0.0)),
            link_cos=float(get("label-free-link-cos", 0.7)),
            link_window_s=float(get("label-free-link-window-s", 0.0)),
            share_memories=_flag(get("share-memories", False)),
            shared_cos=float(get("label-free-shared-cos", 0.7)),
            label_free_nodes=tuple(
                n.strip()
                for n in str(run_config.get("label-free-nodes", "")).split(",")
                if n.strip()
            ),
            node_name=node_name,
            truth_path=truth_path,
            partition=partition,
            adapter_dir=Path(str(adapter_dir)).expanduser() if adapter_dir else None,
            sim_out_dir=Path(str(sim_out)).expanduser() if sim_out else None,
            train_split=str(get("train-split", "train")),
            eval_split=str(get("eval-split", "test")),
            threads=int(node_config.get("threads", run_config.get("client-threads", 1))),
            device=str(get("device", "cpu")),
            text_cache=Path(str(get("text-cache"))).expanduser() if get("text-cache") else None,
        )


def _sim_gallery_node(root: Path, partition_id: int, num_partitions: int) -> str:
    """Node id of a simulated partition in gallery mode: the i-th node dir, sorted."""
    names = sorted(p.name for p in root.iterdir() if (p / "data").is_dir()) if root.is_dir() else []
    if len(names) != num_partitions:
        raise DatasetError(
            f"simulation with {num_partitions} nodes, but gallery-root {root} holds "
            f"{len(names)} node data dirs"
        )
    return names[partition_id]


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@dataclass(frozen=True)
class RoundUpdate:
    """What a node's train round sends back: the adapter payload (the keys the server
    sent), its metrics (with `num-examples`) and, when it shares them, its memories."""

    payload: dict[str, torch.Tensor]
    metrics: dict[str, float]
    memories: SharedMemories | None = None


@dataclass
class NodeData:
    name: str
    train: list[Record]
    heldout: list[Record]


def select_partition(records: list[Record], partition_id: int, num_partitions: int) -> str:
    """Node name of a simulated partition: the i-th distinct `node` value, sorted.

    The dataset must name exactly `num_partitions` nodes, so that a simulated node sees
    what the real one would (its own cameras), never a random IID slice.
    """
    names = sorted({r.node for r in records if r.node})
    if len(names) != num_partitions:
        raise DatasetError(
            f"simulation with {num_partitions} nodes, but the dataset names {len(names)} "
            f"nodes ({', '.join(names[:6]) or 'none'}); generate it with as many nodes"
        )
    return names[partition_id]


def gallery_records(
    data_dir: Path, node_name: str = "", person_ids: Mapping[str, int] | None = None
) -> list[Record]:
    """The crops of a node daemon's gallery as training records: captions where Ingest or
    the drop folder gave them; no identities (a site has none), so every crop is its own
    person (id -catalog id), which the id-aware loss then treats as a plain image-caption
    pair. `person_ids` (simulation: ingest file name -> the generator's hidden person id)
    only lets the pseudo-label figures be measured; label-free training never reads ids."""
    from edge_node.serving.gallery import read_catalog

    person_ids = person_ids or {}
    root = Path(data_dir) / "gallery"
    return [
        Record(
            root / row.path,
            row.captions,
            person_ids.get(row.file_name, -row.id),
            camera_id=row.camera_id,
            split="train",
            node=node_name or None,
            timestamp_ms=row.timestamp_ms,
        )
        for row in read_catalog(root)
    ]


def is_label_free(settings: NodeFlSettings, name: str) -> bool:
    """Whether this node trains without captions: every node, or one the run names."""
    return settings.label_free or name in settings.label_free_nodes


def _hidden_ids(settings: NodeFlSettings) -> dict[str, int]:
    """Simulation from galleries: dataset-relative file name -> hidden person id."""
    if settings.truth_path is None:
        return {}
    path = settings.truth_path.resolve()
    root = path if path.is_dir() else path.parent
    out = {}
    for r in load_records(path):
        with contextlib.suppress(ValueError):
            out[str(r.image_path.resolve().relative_to(root))] = r.person_id
    return out


def load_node_data(settings: NodeFlSettings) -> NodeData:
    if settings.gallery is not None:
        crops = gallery_records(settings.gallery, settings.node_name, _hidden_ids(settings))
        name = settings.node_name or settings.gallery.name
        label_free = is_label_free(settings, name)
        train = crops if label_free else [r for r in crops if r.captions]
        log.info(
            "node %s: gallery %s holds %d crops, %d with captions (%s)",
            name, settings.gallery, len(crops), sum(1 for r in crops if r.captions),
            "label-free: all of them, captions ignored" if label_free else "trained on those",
        )  # fmt: skip
        if not train:
            raise DatasetError(
                f"node {name}: the gallery at {settings.gallery} has {len(crops)} crops but "
                + (
                    "training needs at least one"
                    if label_free
                    else "none with captions; set label-free=true in --node-config to "
                    "train on uncaptioned crops (docs/label-free.md)"
                )
            )
        return NodeData(name, train, [])
    records = load_records(settings.data_path)
    name = settings.node_name
    if settings.partition is not None and not name:
        name = select_partition(records, *settings.partition)
    if name and any(r.node for r in records):
        records = [r for r in records if r.node == name]
    train = [r for r in records if r.split == settings.train_split]
    heldout = [r for r in records if r.split == settings.eval_split]
    if not train:
        raise DatasetError(
            f"node {name or '?'}: no {settings.train_split!r} records in {settings.data_path}"
        )
    return NodeData(name or settings.data_path.name, train, heldout)


class TrainerRegistry:
    """The NodeTrainers of one process, by key: the owner of their caches.

    Flower's Ray backend pickles the ClientApp into its actor for every message. A trainer
    therefore travels as (its registry's import path, its key) and resolves on arrival to
    the trainer of that key in the receiving process's registry, created there on the first
    message, so model, image banks and text cache survive between rounds instead of being
    rebuilt per message (model load, image decoding and caption encoding were 25 s of every
    32 s demo round). `ref` ("module:attribute") is where this registry is reachable in any
    process; the ClientApp module holds the process's one (`client_app.TRAINERS`).
    """

    def __init__(self, ref: str = "") -> None:
        self.ref = ref
        self._trainers: dict[str, NodeTrainer] = {}

    def create(self) -> NodeTrainer:
        """A new trainer of this registry (one per ClientApp)."""
        return self.resolve(uuid.uuid4().hex)

    def resolve(self, key: str) -> NodeTrainer:
        """The trainer `key` of this registry, created on first use (in a fresh process)."""
        trainer = self._trainers.get(key)
        if trainer is None:
            trainer = self._trainers[key] = NodeTrainer(key, registry=self)
        return trainer

    def __contains__(self, key: object) -> bool:
        return key in self._trainers

    def __iter__(self) -> Iterator[NodeTrainer]:
        return iter(list(self._trainers.values()))

    def __len__(self) -> int:
        return len(self._trainers)


def _registry_at(ref: str) -> TrainerRegistry:
    module, _, name = ref.partition(":")
    registry = getattr(importlib.import_module(module), name, None)
    if not isinstance(registry, TrainerRegistry):
        raise pickle.PicklingError(f"{ref!r} names no TrainerRegistry")
    return registry


def _resolve_trainer(ref: str, key: str) -> NodeTrainer:
    """Unpickling a trainer: the trainer `key` of this process's registry `ref`."""
    return _registry_at(ref).resolve(key)


class NodeTrainer:
    """One per ClientApp process: keeps the model, image banks and text cache across rounds.

    A simulation process serves several virtual nodes in turn, so per-node objects are
    keyed by node; the model is shared (every round loads the full global adapter into it,
    and with FFA-LoRA A never trains, so nothing of one node leaks into another's round).

    A trainer of a `TrainerRegistry` pickles as a reference into it (see there); one made
    on its own (tests, one-off use) refuses to be pickled rather than travel as a copy.
    """

    def __init__(self, key: str | None = None, *, registry: TrainerRegistry | None = None) -> None:
        self.key = key or uuid.uuid4().hex
        self.registry = registry
        self._model_key: tuple | None = None
        self._model = None
        self._data: dict[tuple, NodeData] = {}
        self._banks: dict[tuple, Any] = {}
        self._text_cache = None

    def __reduce__(self):
        registry = self.registry
        if registry is None or not registry.ref or _registry_at(registry.ref) is not registry:
            raise pickle.PicklingError(
                "a NodeTrainer pickles as a reference to its process's TrainerRegistry; "
                "create it with a registry that its `ref` names (client_app.TRAINERS)"
            )
        return (_resolve_trainer, (registry.ref, self.key))

    # ------------------------------------------------------------------ set-up
    def model(self, plan: RoundPlan):
        from common.lora import get_adapter_state, lora_a_digest

        if plan.adapter_key != self._model_key:
            self._model, self._model_key = plan.create_adapter(), plan.adapter_key
        digest = plan.lora_a_digest
        if plan.freeze_a and digest and lora_a_digest(get_adapter_state(self._model)) != digest:
            raise AdapterMismatch(
                "FFA-LoRA: this node's frozen A differs from the server's "
                "(different model files, peft or torch version?); refusing to train"
            )
        return self._model

    def data(self, settings: NodeFlSettings) -> NodeData:
        if settings.gallery is not None:  # it grows while the daemon runs: read every round
            return load_node_data(settings)
        key = (str(settings.data_path), settings.node_name, settings.partition)
        if key not in self._data:
            self._data[key] = load_node_data(settings)
        return self._data[key]

    def _bank(self, settings: NodeFlSettings, data: NodeData, model):
        from common.train import ImageBank, core_model

        pre = core_model(model).preprocess
        # a gallery's crops change between rounds: its bank is keyed by what it holds
        held = (len(data.train), str(data.train[-1].image_path)) if settings.gallery else ()
        key = (
            str(settings.data_path), str(settings.gallery), data.name, repr(pre), held,
            settings.camera_norm,
        )  # fmt: skip
        if key not in self._banks:
            if settings.gallery is not None:  # one bank per gallery: drop last round's
                self._banks = {k: v for k, v in self._banks.items() if k[1] != key[1]}
            crops = data.train + data.heldout
            norm = None
            if settings.camera_norm:  # per camera, from this node's own crops
                from common.camera_norm import gallery_camera_norm

                norm = gallery_camera_norm(crops)
            self._banks[key] = ImageBank(crops, pre, norm)
        return self._banks[key]

    def _cache(self, model, settings: NodeFlSettings):
        from common.train import TextFeatureCache, core_model

        fingerprint = core_model(model).text_fingerprint
        if self._text_cache is None or self._text_cache.fingerprint != fingerprint:
            self._text_cache = TextFeatureCache.load(settings.text_cache, fingerprint)
        return self._text_cache

    def load_global(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]):
        """The node's model with the server's global adapter in it (checked)."""
        from common.lora import is_lora_a, set_adapter_state

        if plan.freeze_a and any(is_lora_a(k) for k in global_state):
            raise AdapterMismatch("FFA-LoRA round, but the server sent LoRA A tensors")
        model = self.model(plan)
        set_adapter_state(model, global_state, allow_subset=plan.freeze_a, where="global adapter")
        return model

    # ------------------------------------------------------------------ round steps
    def train_round(
        self,
        settings: NodeFlSettings,
        plan: RoundPlan,
        global_state: Mapping[str, torch.Tensor],
        shared: SharedMemories | None = None,
    ) -> RoundUpdate:
        """Train locally (label-free with the other nodes' `shared` memories, if any)."""
        from common.evaluate import evaluate
        from common.lora import get_adapter_state
        from common.train import TrainConfig, train
        from edge_node.fl.label_free import train_label_free

        data = self.data(settings)
        model = self.load_global(plan, global_state)
        reference = None
        if plan.proximal_mu > 0:
            reference = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }
        cfg = TrainConfig(
            epochs=plan.local_epochs,
            lr=plan.round_lr,
            batch_size=plan.batch_size,
            max_steps=plan.max_steps or None,
            proximal_mu=plan.proximal_mu,
            seed=plan.seed * 1_000_003 + plan.server_round * 7919 + zlib.crc32(data.name.encode()),
            device=settings.device,
            progress=False,
        )
        bank, cache = self._bank(settings, data, model), self._cache(model, settings)
        mined: dict[str, float] = {}
        own: SharedMemories | None = None
        if is_label_free(settings, data.name):
            share = plan.share_memories and settings.share_memories
            result, mined, own = train_label_free(
                model,
                data.train,
                cfg,
                bank,
                settings.label_free_round(),
                shared,
                share=share,
            )
        else:
            result = train(model, data.train, cfg, reference=reference, text_cache=cache, bank=bank)
        from edge_node.fl.privacy import guard_update

        state = get_adapter_state(model)
        # checked here, before anything leaves: keys, shapes, dtypes, finite, the change
        # clipped to the plan's bound (what the server cannot check under SecAgg+)
        payload, change_norm = guard_update(
            {k: state[k] for k in global_state}, global_state, plan.update_clip_norm
        )
        metrics = {
            # under DP every node weighs the same (the noise is calibrated to a plain mean)
            "num-examples": 1 if plan.uniform_weights else result.num_examples,
            "train-loss": result.losses[-1],
            "train-seconds": result.seconds,
            # the node's cost: this process's peak resident memory so far (a SuperNode runs
            # one ClientApp process per run; a simulation process serves several nodes)
            "peak-rss-mb": _peak_rss_mb(),
            **mined,
        }
        if plan.local_eval and data.heldout:
            local = evaluate(model, data.heldout, text_cache=cache, bank=bank)
            metrics.update({"local-r1": local["R1"], "local-map": local["mAP"]})
        log.info(
            "node %s round %d: %d pairs, loss %.4f, change norm %.4g%s, %.1fs",
            data.name,
            plan.server_round,
            result.num_examples,
            result.losses[-1],
            change_norm,
            f" (clipped to {plan.update_clip_norm:g})"
            if plan.update_clip_norm and change_norm > plan.update_clip_norm
            else "",
            result.seconds,
        )
        return RoundUpdate(payload, metrics, own)

    def evaluate_round(
        self,
        settings: NodeFlSettings,
        plan: RoundPlan,
        global_state: Mapping[str, torch.Tensor],
    ) -> dict[str, float]:
        """Local retrieval metrics of the global adapter on the node's held-out split."""
        from common.evaluate import evaluate

        data = self.data(settings)
        if not data.heldout:
            return {"num-examples": 0}
        model = self.load_global(plan, global_state)
        bank, cache = self._bank(settings, data, model), self._cache(model, settings)
        metrics = evaluate(model, data.heldout, text_cache=cache, bank=bank)
        return {
            "num-examples": int(metrics.get("queries", len(data.heldout))),
            "r1": metrics["R1"],
            "r5": metrics["R5"],
            "map": metrics["mAP"],
        }

    def hand_over(
        self,
        settings: NodeFlSettings,
        plan: RoundPlan,
        global_state: Mapping[str, torch.Tensor],
        *,
        run_id: int = 0,
    ) -> tuple[Path | None, str]:
        """Write the final global adapter into the daemon's adapter dir, atomically.

        The daemon watches `adapter-dir` and hot-swaps the newest complete adapter;
        `save_adapter` renames a finished directory into place, so it never sees half of
        one. Returns (path or None when this node has no adapter dir, model version).
        """
        from common.adapters import save_adapter

        target = self.handover_dir(settings)
        if target is None:
            log.info("no adapter-dir configured; the final adapter is not handed over")
            return None, ""
        model = self.load_global(plan, global_state)
        manifest = save_adapter(
            model,
            target,
            round=plan.server_round,
            extra={"source": "flower", "run-id": int(run_id), "strategy": plan.strategy},
        )
        log.info("handed the final global adapter to %s (%s)", target, manifest.model_version)
        return target, manifest.model_version

    def handover_dir(self, settings: NodeFlSettings) -> Path | None:
        if settings.adapter_dir is not None:
            return settings.adapter_dir / HANDOVER_NAME
        if settings.sim_out_dir is not None and settings.partition is not None:
            name = self.data(settings).name
            return settings.sim_out_dir / "nodes" / name / "adapters" / HANDOVER_NAME
        return None


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
