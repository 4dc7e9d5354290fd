"""Student nodes in the simulation: some sites serve a distilled image tower (issue 15).

As it would run in deployment: the server distils the final global model (the teacher)
into a student on the neutral source split it already holds (feature mimicry, no
captions); each student node then refines that student on its own train crops (no
captions, no image leaves it) and serves it, vector-only by default. The broker gets a
folder of calibration crops (source crops: the operator's, not any node's) to verify each
student before merging its scores with the teacher nodes' (server/broker/students.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.datasets import Record
from common.distill import DistillConfig, distill, save_student, student_from_config
from common.errors import ConfigError
from common.factory import create_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentSection:
    """`[students]` of a sim config; no `nodes`: every node serves the teacher."""

    nodes: tuple[str, ...] = ()  # node ids served by a student, e.g. ["node3", "node4"]
    model: str = "student-3stage"  # the student's model config (docs/compress.md)
    source_epochs: int = 30  # server: mimicry on the source split
    node_epochs: int = 20  # each student node: refinement on its own train crops
    lr: float = 2e-3
    node_lr: float = 1e-3
    vector_only: bool = True  # student nodes load no text tower
    calibration_crops: int = 32  # source crops the broker verifies students with

    def __post_init__(self) -> None:
        if self.source_epochs < 1 or self.node_epochs < 0:
            raise ConfigError("students: source-epochs must be >= 1 and node-epochs >= 0")
        if self.calibration_crops < 1:
            raise ConfigError("students: calibration-crops must be >= 1")


@dataclass
class StudentRun:
    dirs: dict[str, Path] = field(default_factory=dict)  # node id -> student model dir
    calibration: Path | None = None  # the broker's [students] calibration-crops folder
    seconds: float = 0.0


def _crops(records: Sequence[Record]) -> list[Record]:
    return [dataclasses.replace(r, captions=()) for r in records]


def distil_students(
    section: StudentSection,
    base_spec: str,
    adapter: Path,
    source: Sequence[Record],
    train_by_node: dict[str, list[Record]],
    out: Path,
    *,
    seed: int = 0,
    progress: bool = True,
) -> StudentRun:
    unknown = sorted(set(section.nodes) - set(train_by_node))
    if unknown:
        known = sorted(train_by_node)
        raise ConfigError(f"students: nodes {unknown} are not in the data (nodes: {known})")
    if not source:
        raise ConfigError("students: the data has no source split to distil on")
    t0 = time.perf_counter()
    teacher = create_model(base_spec, adapter=adapter).eval()
    shared = student_from_config(teacher, section.model, seed=seed)
    cfg = DistillConfig(
        epochs=section.source_epochs, lr=section.lr, text_weight=0.0, seed=seed, progress=progress
    )
    fit = distill(shared, teacher, _crops(source), cfg, desc="distil (source)")
    log.info("student %s on the source split: loss %.4f", section.model, fit.losses[-1])
    run = StudentRun()
    node_cfg = dataclasses.replace(cfg, epochs=max(section.node_epochs, 1), lr=section.node_lr)
    for node in section.nodes:
        student = copy.deepcopy(shared)
        if section.node_epochs:
            own = _crops(train_by_node[node])
            distill(student, teacher, own, node_cfg, desc=f"distil ({node})")
        run.dirs[node] = save_student(student, out / "students" / node)
    calib = out / "calibration-crops"
    shutil.rmtree(calib, ignore_errors=True)
    calib.mkdir(parents=True)
    step = max(1, len(source) // section.calibration_crops)
    for i, r in enumerate(source[::step][: section.calibration_crops]):
        shutil.copy(r.image_path, calib / f"{i:03d}{Path(r.image_path).suffix}")
    run.calibration = calib
    run.seconds = time.perf_counter() - t0
    return run
