"""Plan and render a synthetic multi-camera person benchmark.

Planning (identities, camera visits, poses, captions, timestamps) happens in this process
from seeded generators; rendering is a pure function of one image's spec, fanned out over a
process pool. Every random draw is seeded from (seed, purpose, index), never from a shared
stream, so the output is byte-identical for the same arguments whatever the worker count.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.errors import ConfigError
from sims.synth.attributes import Identity, node_weights, sample_identity
from sims.synth.cameras import (
    LOOK_SETS,
    SHIFT_LEVELS,
    CameraStyle,
    make_camera_style,
    neutral_style,
)
from sims.synth.captions import write_captions
from sims.synth.render import Pose, next_frame, render_crop, sample_pose

log = logging.getLogger(__name__)

# Bump when the same SynthConfig would render different bytes (looks, renderer, captions):
# cached datasets are keyed by it, so a stale one is never reused.
# 2: learnable coloured-light camera looks; 3: CCTV failure modes no colour gain undoes
# (`looks = "v3"`, v2's looks still selectable), crops of one visit form a tracklet;
# 4: two lights across every frame and the camera's exposure curve (`looks = "v4"`, the
# default: v3 destroyed too much to be learnable, docs/benchmark.md)
GENERATOR_VERSION = 4
BASE_TIME_MS = 1_714_550_400_000  # 2024-05-01T08:00:00Z: all timestamps are after this
# Seed purposes: each draws from its own stream, so adding one never shifts the others.
_PLAN, _CAMERA, _IDENTITY, _POSE, _CAPTION, _RENDER = range(6)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines the benchmark's bytes."""

    identities: int = 400  # target-domain people (train + test)
    source_identities: int = 1500  # neutral-camera people for pre-training the base model
    source_images: int = 2  # crops per source identity, each on a different source camera
    cameras: int = 8  # target cameras, split into contiguous blocks over nodes
    nodes: int = 4
    images_per_camera: int = 2  # crops of one person on one camera visit
    source_cameras: int = 4
    size: tuple[int, int] = (128, 64)  # (H, W)
    shift: str = "strong"  # none | mild | strong
    seed: int = 0
    test_fraction: float = 0.4  # target identities held out as the test split
    cameras_per_identity: tuple[int, int] = (2, 5)
    occlusion: float = 0.25  # probability of an occluder per crop
    partial_captions: float = 0.35  # probability that a caption covers only 2-3 attributes
    looks: str = "v4"  # camera look set: v4 (two lights + exposure), v3 (CCTV failure
    # modes), v2 (one coloured light); sims/synth/cameras.py

    def __post_init__(self) -> None:
        if self.identities < 2:
            raise ConfigError(f"`identities` must be >= 2 (train and test), got {self.identities}")
        if self.source_identities < 0:
            raise ConfigError(f"`source_identities` must be >= 0, got {self.source_identities}")
        if self.nodes < 1 or self.cameras < self.nodes:
            raise ConfigError(
                f"need 1 <= `nodes` <= `cameras` (each node owns >= 1 camera), "
                f"got nodes={self.nodes} cameras={self.cameras}"
            )
        if min(self.images_per_camera, self.source_cameras, self.source_images) < 1:
            raise ConfigError(
                "`images_per_camera`, `source_cameras` and `source_images` must be >= 1"
            )
        if len(self.size) != 2 or min(self.size) < 16:
            raise ConfigError(f"`size` must be (H, W) with both >= 16, got {self.size}")
        if self.looks not in LOOK_SETS:
            raise ConfigError(f"`looks` must be one of {sorted(LOOK_SETS)}, got {self.looks!r}")
        if self.shift not in SHIFT_LEVELS:
            raise ConfigError(f"`shift` must be one of {sorted(SHIFT_LEVELS)}, got {self.shift!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"`test_fraction` must be in (0, 1), got {self.test_fraction}")
        lo, hi = self.cameras_per_identity
        if not 1 <= lo <= hi:
            raise ConfigError(f"`cameras_per_identity` must be 1 <= lo <= hi, got {(lo, hi)}")
        for name in ("occlusion", "partial_captions"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"`{name}` must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class ImageSpec:
    """One crop to render: a pure function of these fields."""

    index: int
    file_path: str  # relative to the output dir
    identity: Identity
    pose: Pose
    style: CameraStyle
    size: tuple[int, int]
    seed: int
    occlusion: float


@dataclass
class Plan:
    specs: list[ImageSpec] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    identities: list[dict] = field(default_factory=list)
    cameras: dict[str, dict] = field(default_factory=dict)


def _rng(cfg: SynthConfig, purpose: int, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, purpose, index])


def camera_nodes(cfg: SynthConfig) -> dict[str, str]:
    """Target camera id -> node name; contiguous, disjoint blocks ("c01", "c02" -> "node1")."""
    return {f"c{i + 1:02d}": f"node{i * cfg.nodes // cfg.cameras + 1}" for i in range(cfg.cameras)}


def _visits(cfg: SynthConfig, home: str, nodes: dict[str, str], rng: np.random.Generator):
    """2-5 cameras: the first at the home node, later ones there 60% of the time."""
    lo, hi = cfg.cameras_per_identity
    n = min(int(rng.integers(lo, hi + 1)), len(nodes))
    at_home = [c for c, nd in nodes.items() if nd == home]
    away = [c for c, nd in nodes.items() if nd != home]
    chosen = [at_home.pop(int(rng.integers(len(at_home))))]
    while len(chosen) < n:
        pool = at_home if at_home and (not away or rng.random() < 0.6) else away
        chosen.append(pool.pop(int(rng.integers(len(pool)))))
    return chosen


def plan(cfg: SynthConfig) -> Plan:
    """Identities, visits, poses, captions and records; no pixels yet."""
    out = Plan()
    nodes = camera_nodes(cfg)
    node_names = sorted(set(nodes.values()), key=lambda n: int(n[4:]))
    styles: dict[str, CameraStyle] = {}
    for i, cam in enumerate(nodes):
        styles[cam] = make_camera_style(cam, i, cfg.shift, _rng(cfg, _CAMERA, i), cfg.looks)
    src_cams = [f"s{i + 1:02d}" for i in range(cfg.source_cameras)]
    for cam in src_cams:
        styles[cam] = neutral_style(cam)
    for cam, style in styles.items():
        out.cameras[cam] = {"node": nodes.get(cam), **asdict(style)}

    prng = _rng(cfg, _PLAN, 0)
    homes = [node_names[i % len(node_names)] for i in prng.permutation(cfg.identities)]
    n_test = max(1, round(cfg.identities * cfg.test_fraction))
    test_ids = set(prng.permutation(cfg.identities)[:n_test].tolist())
    people = []  # (person_id, split, home node or None, Identity, [(camera, images)])
    for pid in range(cfg.identities + cfg.source_identities):
        rng = _rng(cfg, _IDENTITY, pid)
        if pid < cfg.identities:
            home = homes[pid]
            ident = sample_identity(pid, rng, node_weights(node_names.index(home)))
            cams = _visits(cfg, home, nodes, rng)
            shots = [(c, cfg.images_per_camera) for c in cams]
            split = "test" if pid in test_ids else "train"
        else:
            home, split = None, "source"
            ident = sample_identity(pid, rng, node_weights(None))
            many = cfg.source_images > len(src_cams)
            picks = Counter(rng.choice(len(src_cams), cfg.source_images, replace=many).tolist())
            shots = [(src_cams[i], n) for i, n in sorted(picks.items())]
            cams = [c for c, _ in shots]
        people.append((pid, split, home, ident, shots))
        out.identities.append(
            {"id": pid, "split": split, "home_node": home, "cameras": cams, **ident.to_json()}
        )

    index = 0
    tracklet = 0
    for pid, split, _home, ident, shots in people:
        trng = _rng(cfg, _PLAN, 1 + pid)
        t = BASE_TIME_MS + int(trng.integers(0, 12 * 3600 * 1000))
        for cam, n_images in shots:
            t += int(trng.integers(30_000, 600_000))  # walking to the next camera
            tracklet += 1  # one visit of one person to one camera: one tracklet
            pose = None
            for k in range(n_images):
                # the crops of a visit follow one walk: same view, small changes frame to frame
                prng = _rng(cfg, _POSE, index)
                pose = sample_pose(prng) if pose is None else next_frame(pose, prng)
                rel = f"imgs/{split}/{cam}/{pid:05d}_{cam}_{k:02d}.jpg"
                caps = write_captions(
                    ident, pose.view, _rng(cfg, _CAPTION, index), 2, cfg.partial_captions
                )
                stamp = t + k * int(trng.integers(300, 1500))
                out.specs.append(
                    ImageSpec(
                        index, rel, ident, pose, styles[cam], cfg.size, cfg.seed, cfg.occlusion
                    )
                )
                out.records.append(
                    {
                        "split": split,
                        "captions": caps,
                        "file_path": rel,
                        "id": pid,
                        "camera": cam,
                        "node": nodes.get(cam),
                        "timestamp_ms": stamp,
                        "view": pose.view,
                        "tracklet": tracklet,  # ground truth, for evaluating tracklet linking
                    }
                )
                index += 1
    return out


def render_spec(spec: ImageSpec, out_dir: str) -> None:
    """Render and write one JPEG (runs in a worker process)."""
    rng = np.random.default_rng([spec.seed, _RENDER, spec.index])
    img = render_crop(spec.identity, spec.pose, spec.style, spec.size, rng, spec.occlusion)
    path = os.path.join(out_dir, spec.file_path)
    img.save(path, format="JPEG", quality=spec.style.jpeg_quality, subsampling=2, optimize=False)


def _render_chunk(args: tuple[list[ImageSpec], str]) -> int:
    specs, out_dir = args
    for spec in specs:
        render_spec(spec, out_dir)
    return len(specs)


def summarize(cfg: SynthConfig, p: Plan) -> dict:
    """Counts per split, node and camera, and the evidence that nodes are non-IID."""
    by_split = Counter(r["split"] for r in p.records)
    ids_by_split = {s: len({r["id"] for r in p.records if r["split"] == s}) for s in by_split}
    nodes: dict[str, dict] = defaultdict(lambda: {"images": 0, "cameras": [], "ids": set()})
    for cam, info in p.cameras.items():
        if info["node"]:
            nodes[info["node"]]["cameras"].append(cam)
    for r in p.records:
        if r["node"]:
            nodes[r["node"]]["images"] += 1
            nodes[r["node"]]["ids"].add(r["id"])
    per_id_nodes = defaultdict(set)
    for r in p.records:
        if r["node"]:
            per_id_nodes[r["id"]].add(r["node"])
    home_hist: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for ident in p.identities:
        if ident["home_node"]:
            for attr in ("upper", "lower", "headwear", "bag"):
                home_hist[ident["home_node"]][attr][ident[attr]] += 1
    captions = [c for r in p.records for c in r["captions"]]
    return {
        "generator_version": GENERATOR_VERSION,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "images": len(p.records),
        "images_per_split": dict(sorted(by_split.items())),
        "identities_per_split": dict(sorted(ids_by_split.items())),
        "nodes": {
            n: {"images": v["images"], "cameras": v["cameras"], "identities": len(v["ids"])}
            for n, v in sorted(nodes.items())
        },
        "cameras": {
            cam: {
                "node": info["node"],
                "look": info["look"],
                "images": sum(1 for r in p.records if r["camera"] == cam),
            }
            for cam, info in p.cameras.items()
        },
        "identities_on_several_nodes": sum(1 for v in per_id_nodes.values() if len(v) > 1),
        "captions": {"total": len(captions), "distinct": len(set(captions))},
        "home_node_attributes": {
            n: {a: dict(sorted(c.items())) for a, c in v.items()}
            for n, v in sorted(home_hist.items())
        },
    }


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def generate(cfg: SynthConfig, out_dir: str | Path, workers: int | None = None) -> dict:
    """Write images, annotations.json, identities.json, cameras.json and summary.json."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    p = plan(cfg)
    for d in sorted({str(Path(s.file_path).parent) for s in p.specs}):
        (out / d).mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    size = max(8, len(p.specs) // (workers * 8))
    chunks = [(p.specs[i : i + size], str(out)) for i in range(0, len(p.specs), size)]
    if workers <= 1 or len(chunks) <= 1:
        _render_chunk((p.specs, str(out)))
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a parent holding torch threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for _ in pool.map(_render_chunk, chunks):
                pass
    _dump(p.records, out / "annotations.json")
    _dump(p.identities, out / "identities.json")
    _dump(p.cameras, out / "cameras.json")
    summary = summarize(cfg, p)
    _dump(summary, out / "summary.json")
    log.info(
        "synth: %d images (%s) in %.1f s with %d workers -> %s",
        len(p.specs),
        summary["images_per_split"],
        time.perf_counter() - t0,
        workers,
        out,
    )
    return summary
