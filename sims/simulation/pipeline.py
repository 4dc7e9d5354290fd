"""`fedretrieve sim`: the whole system on one machine, one command, one report.

Stages (each a plain function, so tests and benchmarks can run them alone):
data -> base model -> federated runs (Flower simulation engine) -> baselines
(zero-shot, local-only, centralised) -> serving (real node daemons + broker on loopback)
-> report. The config is one TOML file (sims/configs/default.toml).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.camera_norm import gallery_camera_norm
from common.config import from_dict, load_toml
from common.datasets import Record, load_records, read_dataset
from common.errors import ConfigError, DatasetError
from common.metrics import METRIC_KEYS
from sims.pretrain import PretrainConfig, ensure_base_model
from sims.simulation.serving import ServingSettings
from sims.simulation.students import StudentSection, distil_students
from sims.synth.sceptics import fit_colour_match

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class DataSection:
    """Where the data comes from. With `path` empty, the synthetic benchmark is generated
    from the `synth` table (keys of `fedretrieve synth`) and cached."""

    path: str = ""  # a real dataset in any supported format
    format: str = "auto"
    nodes: int = 4  # real datasets: cameras are dealt to this many nodes
    synth: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BaseSection:
    model: str = "default"  # config pretrained on the source split, or a ready model dir
    pretrain: bool = True  # False: use `model` as it is (e.g. a real CLIP)
    epochs: int = PretrainConfig.epochs  # one recipe: `fedretrieve pretrain`'s
    lr: float = PretrainConfig.lr
    frozen_image_stages: int = PretrainConfig.frozen_image_stages


@dataclass(frozen=True)
class FederatedSection:
    strategies: tuple[str, ...] = ("fedavg",)
    default: str = "fedavg"  # the strategy reported as "federated"
    rounds: int = 8
    local_epochs: int = 1
    lr: float = 4e-3  # docs/benchmark.md: best of 2e-3, 4e-3, 6e-3 on generator v4
    batch_size: int = 32
    # train from the nodes' own daemons: their train crops ingested over Ingest (without
    # captions at label-free nodes), read by the Flower clients (sims/simulation/train_galleries)
    from_galleries: bool = False
    # more FL seeds for the default strategy: R1 moves by about a point between FL seeds
    # (docs/label-free.md section 8), more than many effects, so the report gives the spread
    seeds: tuple[int, ...] = ()
    options: dict = field(default_factory=dict)  # further Flower run-config keys

    def __post_init__(self) -> None:
        if self.default not in self.strategies:
            raise ConfigError(
                f"federated.default {self.default!r} is not in "
                f"federated.strategies {list(self.strategies)}"
            )
        if self.rounds < 1 or self.local_epochs < 1:
            raise ConfigError("federated.rounds and federated.local-epochs must be >= 1")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"federated.seeds repeats a seed: {list(self.seeds)}")
        if self.seeds and "seed" in self.options:
            raise ConfigError("federated.seeds and federated.options' seed: set one of them")


@dataclass(frozen=True)
class BaselineSection:
    local_only: bool = True
    centralized: bool = True


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    base: BaseSection = field(default_factory=BaseSection)
    federated: FederatedSection = field(default_factory=FederatedSection)
    baselines: BaselineSection = field(default_factory=BaselineSection)
    serving: ServingSettings = field(default_factory=ServingSettings)
    students: StudentSection = field(default_factory=StudentSection)
    serve: bool = True
    # train, evaluate and serve on crops normalised per camera (`common/camera_norm.py`, the
    # nodes' `[camera-norm]`); zero-shot stays on the raw crops beside zero-shot + camera norm
    camera_norm: bool = False

    def __post_init__(self) -> None:
        if self.seed in self.federated.seeds:
            raise ConfigError(
                f"federated.seeds: {self.seed} is the config's own seed, which always runs"
            )


def load_sim_config(path: str | Path | None) -> SimConfig:
    path = Path(path) if path else CONFIG_DIR / "default.toml"
    return from_dict(SimConfig, load_toml(path), str(path))


# --------------------------------------------------------------------------- data
def _lora_touches_text(model) -> bool:
    """Whether the model config's LoRA adapts the text tower (then caption features change
    while training and there is nothing to share between stages)."""
    from common.lora import LoraSettings

    targets = LoraSettings.from_spec(model.spec.get("lora")).targets
    return not all(t.startswith("image") for t in targets)  # raw regexes: assume they might


def prepare_data(section: DataSection, out: Path, cache_dir: Path) -> Path:
    """A dataset directory in our layout with `node` on every record."""
    if not section.path:
        from sims.synth.generate import GENERATOR_VERSION, SynthConfig, generate

        params = {k: tuple(v) if isinstance(v, list) else v for k, v in section.synth.items()}
        cfg = SynthConfig(**params)
        blob = json.dumps({"generator": GENERATOR_VERSION, **asdict(cfg)}, sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        target = cache_dir / "datasets" / f"synth-{key}"
        if not (target / "summary.json").is_file():
            log.info("generating the synthetic benchmark into %s", target)
            tmp = target.with_name(target.name + ".tmp")
            generate(cfg, tmp)
            tmp.rename(target)
        return target
    loaded = read_dataset(section.path, fmt=section.format)
    return partition_by_camera(loaded.records, section.nodes, out / "data")


def partition_by_camera(records: list[Record], nodes: int, out: Path) -> Path:
    """Deal cameras round-robin to nodes (images without a camera: by image hash) and write
    our annotation layout, pointing at the original image files."""
    cameras = sorted({r.camera_id for r in records if r.camera_id})
    home = {cam: f"node{i % nodes}" for i, cam in enumerate(cameras)}
    entries = []
    for r in records:
        node = (
            r.node
            or home.get(r.camera_id)
            or f"node{int(hashlib.md5(str(r.image_path).encode()).hexdigest(), 16) % nodes}"
        )
        entries.append(
            {
                "split": r.split,
                "captions": list(r.captions),
                "file_path": str(r.image_path.resolve()),
                "id": r.person_id,
                "camera": r.camera_id,
                "node": node,
                "timestamp_ms": r.timestamp_ms,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotations.json").write_text(json.dumps(entries))
    return out


def by_node(records: list[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for r in records:
        if not r.node:
            raise DatasetError(f"{r.image_path}: record has no node; partition the data first")
        groups.setdefault(r.node, []).append(r)
    return dict(sorted(groups.items()))


def metric_subset(m: dict) -> dict:
    return {k: round(float(m[k]), 2) for k in METRIC_KEYS}


# --------------------------------------------------------------------------- pipeline
def base_model_spec(cfg: SimConfig, data_dir: Path, cache_dir: Path, *, progress: bool) -> str:
    """The base model the run starts from: pre-trained on the source split (cached) when
    `[base] pretrain`, else the named model as is."""
    if not cfg.base.pretrain:
        return cfg.base.model
    return str(
        ensure_base_model(
            data_dir,
            cache_dir,
            progress=progress,
            model=cfg.base.model,
            epochs=cfg.base.epochs,
            lr=cfg.base.lr,
            frozen_image_stages=cfg.base.frozen_image_stages,
            seed=cfg.seed,
        )
    )


def run_sim(cfg: SimConfig, out: Path, cache_dir: Path, *, progress: bool = True) -> dict:
    """Run every stage and write OUT/report.json, report.md and the plots."""
    from common.evaluate import embed_records, evaluate
    from common.factory import create_model
    from common.train import ImageBank, TextFeatureCache
    from sims.simulation.baselines import centralized, local_only
    from sims.simulation.federated import run_federated
    from sims.simulation.report import write_report

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        stages[name] = round(time.perf_counter() - t0, 1)
        log.info("stage %s done in %.1f s", name, stages[name])

    t0 = time.perf_counter()
    data_dir = prepare_data(cfg.data, out, cache_dir)
    records = load_records(data_dir)
    train_recs = [r for r in records if r.split == "train"]
    test_recs = [r for r in records if r.split == "test"]
    if not train_recs or not test_recs:
        raise DatasetError(f"{data_dir}: need both train and test splits")
    nodes = by_node(train_recs)
    stage("data", t0)

    t0 = time.perf_counter()
    base_spec = base_model_spec(cfg, data_dir, cache_dir, progress=progress)
    base = create_model(base_spec)
    # only evaluated here (every training stage builds its own copy): frozen, its caption
    # features are cacheable, so the three untrained baselines, the Flower server, the
    # baselines and serving encode the test captions once instead of once each (~13 s each)
    base.requires_grad_(False)
    stage("base_model", t0)

    t0 = time.perf_counter()
    text_cache = TextFeatureCache(base.text_fingerprint)
    test_bank = ImageBank(test_recs, base.preprocess)
    zero_shot = evaluate(base, test_recs, text_cache=text_cache, bank=test_bank)
    stage("zero_shot", t0)

    t0 = time.perf_counter()
    camera_norm = gallery_camera_norm(test_recs)  # label-free, from the gallery itself
    normed_bank = ImageBank(test_recs, base.preprocess, camera_norm)
    zero_shot_norm = evaluate(base, test_recs, text_cache=text_cache, bank=normed_bank)
    train_norm = None
    if cfg.camera_norm:  # every later stage sees the normalised crops, as the nodes would
        test_bank, train_norm = normed_bank, gallery_camera_norm(train_recs)
    del normed_bank
    stage("zero_shot_camera_norm", t0)
    untrained = {"zero_shot": zero_shot, "zero_shot_camera_norm": zero_shot_norm}
    sources = [r for r in records if r.split == "source"]
    if sources:  # the sceptic's stronger colour baseline: each camera's colour mean and
        # covariance matched to the source cameras' (docs/benchmark.md, "sceptics")
        t0 = time.perf_counter()
        match = ImageBank(test_recs, base.preprocess, fit_colour_match(test_recs, sources))
        untrained["zero_shot_colour_match"] = evaluate(
            base, test_recs, text_cache=text_cache, bank=match
        )
        del match
        stage("zero_shot_colour_match", t0)

    t0 = time.perf_counter()
    text_cache_file = ""
    if not _lora_touches_text(base):
        # every later stage (Flower server, the node actor, the baselines) needs the same
        # frozen-tower caption features: encode them once here and share them via a file
        text_cache.get(base, [c for r in train_recs for c in r.captions])
        text_cache_file = str(text_cache.save(out / "text-features.pt"))
    stage("text_features", t0)

    fed = cfg.federated
    federated: dict[str, Any] = {}
    repeats: dict[int, Any] = {}  # the default strategy again, under federated.seeds
    # with from-galleries, the nodes' daemons run until every strategy has trained from them
    with contextlib.ExitStack() as galleries:
        gallery_root = ""
        if fed.from_galleries:
            from sims.simulation.train_galleries import label_free_nodes, train_galleries

            t0 = time.perf_counter()
            options = {k.replace("_", "-"): v for k, v in fed.options.items()}
            uncaptioned = label_free_nodes(options, sorted(nodes))
            root = galleries.enter_context(
                train_galleries(nodes, data_dir, base_spec, out, uncaptioned=uncaptioned,
                                camera_norm=cfg.camera_norm)
            )  # fmt: skip
            gallery_root = str(root)
            stage("train_galleries", t0)

        def options(seed: int) -> dict:
            given = {
                "local-epochs": fed.local_epochs,
                "lr": fed.lr,
                "batch-size": fed.batch_size,
                "eval-data": str(data_dir),
                "eval-split": "test",
                "seed": seed,
                "text-cache": text_cache_file,
                "camera-norm": cfg.camera_norm,
                # TOML keys arrive snake_cased; Flower's run config is kebab-case
                **{k.replace("_", "-"): v for k, v in fed.options.items()},
            }
            return given | ({"gallery-root": gallery_root} if gallery_root else {})

        def train(strategy: str, seed: int, *, repeat: bool = False):
            t0 = time.perf_counter()
            run_dir = out / (f"fl-{strategy}-seed{seed}" if repeat else f"fl-{strategy}")
            run = run_federated(
                data_dir, len(nodes), fed.rounds, strategy, base_spec, run_dir,
                options=options(seed),
            )  # fmt: skip
            stage(f"federated_{strategy}_seed{seed}" if repeat else f"federated_{strategy}", t0)
            return run

        for strategy in fed.strategies:
            federated[strategy] = train(strategy, cfg.seed)
        for seed in fed.seeds:
            repeats[seed] = train(fed.default, seed, repeat=True)

    epochs = fed.rounds * fed.local_epochs
    train_kwargs = {
        "epochs": epochs,
        "lr": fed.lr,
        "batch_size": fed.batch_size,
        "seed": cfg.seed,
        "progress": progress,
    }
    local = cent = None
    if cfg.baselines.local_only:
        t0 = time.perf_counter()
        local = local_only(
            base_spec, nodes, test_recs, train_kwargs, text_cache, test_bank, train_norm
        )
        stage("local_only", t0)
    if cfg.baselines.centralized:
        t0 = time.perf_counter()
        cent = centralized(
            base_spec, train_recs, test_recs, train_kwargs, text_cache, test_bank, train_norm
        )
        stage("centralized", t0)

    serving = students = None
    default_run = federated[fed.default]
    if cfg.serve and cfg.students.nodes:
        t0 = time.perf_counter()
        source = [r for r in records if r.split == "source"]
        students = distil_students(
            cfg.students,
            base_spec,
            default_run.final_adapter,
            source,
            nodes,
            out,
            seed=cfg.seed,
            progress=progress,
        )
        stage("students", t0)
    if cfg.serve:
        from sims.simulation.serving import run_serving

        t0 = time.perf_counter()
        final = create_model(base_spec, adapter=default_run.final_adapter)
        emb = embed_records(final, test_recs, text_cache=text_cache, bank=test_bank)
        serving = run_serving(
            by_node(test_recs),
            data_dir,
            base_spec,
            default_run.final_adapter,
            final.version,
            emb,
            out / "serve",
            cfg.serving,
            progress=progress,
            students=students,
            vector_only=cfg.students.vector_only,
            camera_norm=cfg.camera_norm,
        )
        log.info("broker R1 %.2f vs offline %.2f", serving.metrics["R1"], serving.offline["R1"])
        stage("serving", t0)

    report = build_report(
        cfg,
        untrained,
        federated,
        local,
        cent,
        serving,
        base,
        time.perf_counter() - t_start,
        stages,
        data_dir,
        repeats,
    )
    write_report(report, out, federated, serving)
    return report


def seed_spread(by_seed: dict[int, dict], trivial: dict, *, served: int) -> dict:
    """The default strategy's final figures over FL seeds: per seed, mean, sample sd, and the
    mean gain over the stronger trivial baseline. `served`: the seed of `methods.federated`."""
    import statistics

    out: dict[str, Any] = {"seeds": sorted(by_seed), "served": served}
    for key in ("R1", "mAP"):
        values = [by_seed[s][key] for s in out["seeds"]]
        out[key] = values
        out[f"{key}_mean"] = round(statistics.fmean(values), 2)
        out[f"{key}_sd"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
        out[f"{key}_attributable_mean"] = round(out[f"{key}_mean"] - trivial[key], 2)
    return out


def build_report(
    cfg: SimConfig,
    untrained: dict[str, dict],
    federated: dict,
    local: dict | None,
    cent: dict | None,
    serving,
    base,
    total_s: float,
    stages: dict,
    data_dir: Path,
    repeats: dict | None = None,
) -> dict:
    """The report.json contract (see README): methods in percent, rounds, traffic, broker."""
    default = federated[cfg.federated.default]

    def final_metrics(run) -> dict:
        return metric_subset(run.rounds[-1]["global"])

    methods = {name: metric_subset(m) for name, m in untrained.items()}  # the base model's
    methods["federated"] = final_metrics(default)
    if local:
        methods["local_only"] = metric_subset(local["mean"])
        methods["local_only_best"] = metric_subset(local["best"])
    if cent:
        methods["centralized"] = metric_subset(cent)
    # the trivial baselines a claimed gain must clear (docs/benchmark.md, DESIGN.md section 9)
    trivial = {k: methods[k]["R1"] for k in ("zero_shot_camera_norm", "local_only_best")
               if k in methods}  # fmt: skip
    best_trivial = max(trivial, key=trivial.get) if trivial else "zero_shot"
    for name, run in federated.items():
        methods[f"federated_{name}"] = final_metrics(run)
    # label-free nodes (docs/label-free.md): the federated run is then that kind of run
    options = cfg.federated.options
    if options.get("label_free"):
        methods["federated_label_free"] = methods["federated"]
    elif options.get("label_free_nodes"):
        methods["federated_mixed"] = methods["federated"]
    rounds = [
        {"round": i, **metric_subset(r["global"])}
        for i, r in enumerate(default.rounds)
        if "global" in r and i > 0
    ]
    per_strategy = {
        name: [
            {"round": i, **metric_subset(r["global"])}
            for i, r in enumerate(run.rounds)
            if "global" in r
        ]
        for name, run in federated.items()
    }
    round_s = default.round_seconds
    report = {
        "methods": methods,
        "attributable": {
            "baseline": best_trivial,
            "R1": round(methods["federated"]["R1"] - methods[best_trivial]["R1"], 2),
            "mAP": round(methods["federated"]["mAP"] - methods[best_trivial]["mAP"], 2),
        },
        "rounds": rounds,
        "strategies": per_strategy,
        # what protected the reported run (history.json's "privacy"; docs/privacy.md)
        "privacy": {
            k: default.privacy.get(k) for k in ("secure_aggregation", "dp", "epsilon", "delta")
        },
        "communication": {
            "adapter_bytes_per_node_per_round": int(default.payload_bytes),
            "full_model_bytes": int(default.model_parameters * 4),
            "image_bytes_sent": 0,
            "fraction_of_full_model": default.payload_fraction,
            "per_strategy": {n: int(r.payload_bytes) for n, r in federated.items()},
            **memory_bytes(default.rounds),
        },
        "timing": {
            "total_s": round(total_s, 1),
            "per_round_s": round(sum(round_s) / max(1, len(round_s)), 2),
            "stages_s": stages,
        },
        "setup": {
            "data": str(data_dir),
            "base_model": base.version,
            "nodes": None,
            "config": _jsonable(asdict(cfg)),
            "local_only_per_node": local["per_node"] if local else None,
        },
    }
    if repeats:
        report["seeds"] = seed_spread(
            {cfg.seed: methods["federated"]}
            | {s: final_metrics(run) for s, run in repeats.items()},
            methods[best_trivial],
            served=cfg.seed,
        )
    pseudo = [
        {"round": i, **m} for i, r in enumerate(default.rounds) if (m := pseudo_label_means(r))
    ]
    if pseudo:
        report["pseudo_labels"] = pseudo
    if serving is not None:
        import numpy as np

        lat = np.array(serving.latencies_ms)
        report["broker"] = {
            "queries": serving.queries,
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "coverage": serving.coverage_full,
            "R1": round(serving.metrics["R1"], 2),
            "metrics": metric_subset(serving.metrics),
            "offline": metric_subset(serving.offline),
            "matches_offline": bool(serving.matches_offline),
            "max_metric_diff": serving.max_metric_diff,
            "top10_agreement": serving.top10_agreement,
            "hot_swap_s": round(serving.swap_seconds, 1),
            "merge": serving.merge_modes,
        }
        if cfg.camera_norm:  # what each node's index was embedded with
            report["broker"]["camera_norm"] = serving.camera_norm
        if serving.students:  # nodes that served a distilled student, and the broker's verdict
            report["broker"]["students"] = serving.students
    return report


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def memory_bytes(rounds: list[dict]) -> dict[str, int]:
    """share-memories: the most bytes of memories one node sent, and was sent, in a round
    (beside its adapter); nothing when no memories travelled."""
    up = [b for r in rounds for b in (r.get("memory_upload_bytes") or {}).values()]
    down = [b for r in rounds for b in (r.get("memory_download_bytes") or {}).values()]
    if not up and not down:
        return {}
    return {
        "memory_upload_bytes_per_node_per_round_max": int(max(up, default=0)),
        "memory_download_bytes_per_node_per_round_max": int(max(down, default=0)),
    }


def pseudo_label_means(row: Mapping[str, Any]) -> dict[str, float]:
    """A round's pseudo-label quality: means over its label-free nodes, weighted by their
    crops. In an all-label-free fleet the strategy's weighted train metrics hold them; in a
    mixed fleet only some replies have them, and they are in `partial_train_metrics`."""
    keys = {
        "precision": "pl-precision",
        "recall": "pl-recall",
        "pseudo_ids": "pl-ids",
        "true_ids": "pl-true-ids",
        "tracklet_purity": "pl-tracklet-purity",
    }
    rows = [row.get("train_metrics") or {}]
    if "pl-precision" not in rows[0]:
        rows = [m for m in (row.get("partial_train_metrics") or {}).values()]
    rows = [m for m in rows if "pl-precision" in m]
    if not rows:
        return {}
    if all("mem-received" in m for m in rows):  # share-memories, from its second round
        keys.update({"shared_received": "mem-received", "shared_joined": "mem-joined"})
    weights = [float(m.get("num-examples", 1)) for m in rows]
    total = sum(weights) or 1.0
    return {
        name: round(
            sum(w * m.get(key, float("nan")) for w, m in zip(weights, rows, strict=True)) / total,
            4,
        )
        for name, key in keys.items()
    }
