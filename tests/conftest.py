"""Shared fixtures: small datasets drawn with PIL in tmp_path, nothing downloaded."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

# Offline Hub, for the whole session and the daemons it starts. huggingface_hub reads
# HF_HUB_OFFLINE once, when `huggingface_hub.constants` is imported, so it must be set before
# any test code imports transformers. `pytest_configure` is too late for that: pytest imports
# the conftest.py of every directory named on the command line before calling it, and
# tests/server/conftest.py imports the broker (hence transformers). This root conftest is
# the first test code pytest imports, so the variable is set here, once, and restored in
# `pytest_unconfigure`; `_offline_hub` below fails every test if it did not take effect.
# An explicit HF_HUB_OFFLINE (e.g. =0 to fetch a real model) is left as the caller set it.
_SESSION_ENV = pytest.MonkeyPatch()
if "HF_HUB_OFFLINE" not in os.environ:
    _SESSION_ENV.setenv("HF_HUB_OFFLINE", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    _SESSION_ENV.undo()


@pytest.fixture(scope="session", autouse=True)
def _offline_hub() -> None:
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return  # the caller chose
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, (
        "huggingface_hub was imported before HF_HUB_OFFLINE was set: the tests would try "
        "the network (a plugin or sitecustomize imported it before tests/conftest.py ran)"
    )


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models: a second thread costs more than it gives (restored after the session)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COLOURS = {
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "green": (30, 160, 60),
    "yellow": (230, 210, 40),
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "purple": (130, 40, 160),
    "orange": (240, 130, 20),
}


def draw_person(upper: str, lower: str, seed: int, size: tuple[int, int] = (64, 32)) -> Image.Image:
    """A crude person crop: head, upper and lower garment in the given colours."""
    rng = random.Random(seed)
    h, w = size
    bg = tuple(rng.randint(90, 160) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
    d.ellipse([w * 0.35 + dx, h * 0.02 + dy, w * 0.65 + dx, h * 0.18 + dy], fill=(220, 180, 150))
    d.rectangle([w * 0.2 + dx, h * 0.2 + dy, w * 0.8 + dx, h * 0.55 + dy], fill=COLOURS[upper])
    d.rectangle([w * 0.28 + dx, h * 0.55 + dy, w * 0.72 + dx, h * 0.95 + dy], fill=COLOURS[lower])
    return img


def write_dataset(
    root: Path,
    *,
    identities: int = 12,
    images_per_id: int = 3,
    cameras: int = 2,
    test_ids: int = 4,
    seed: int = 0,
) -> Path:
    """An ICFG-PEDES-layout dataset (our synthetic layout) with distinctive outfits."""
    rng = random.Random(seed)
    names = sorted(COLOURS)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    entries = []
    pairs = [(u, lo) for u in names for lo in names if u != lo]
    rng.shuffle(pairs)
    for pid in range(identities):
        upper, lower = pairs[pid % len(pairs)]
        for j in range(images_per_id):
            cam = f"c{(pid + j) % cameras:02d}"
            rel = f"imgs/{pid:04d}_{cam}_{j}.jpg"
            draw_person(upper, lower, seed=pid * 100 + j).save(root / rel, quality=95)
            entries.append(
                {
                    "split": "test" if pid >= identities - test_ids else "train",
                    "captions": [
                        f"a person wearing a {upper} top and {lower} trousers",
                        f"someone in {lower} pants with a {upper} shirt",
                    ],
                    "file_path": rel,
                    "id": pid,
                    "camera": cam,
                    "node": f"node{(pid + j) % 2}",
                }
            )
    (root / "annotations.json").write_text(json.dumps(entries, indent=1))
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def make_dataset():
    """`write_dataset` for tests that need other sizes (no `import conftest`: with several
    conftest.py files in the suite that name is ambiguous)."""
    return write_dataset


def _write_adapter(out: Path, round_: int, seed: int = 1) -> str:
    """A tiny-model LoRA adapter whose B is perturbed, so its version and embeddings really
    change; returns the model version it serves."""
    from common.adapters import save_adapter
    from common.factory import create_model
    from common.lora import attach_lora

    peft_model = attach_lora(create_model("tiny"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return save_adapter(peft_model, out, round=round_).model_version


@pytest.fixture(scope="session")
def write_adapter():
    """`_write_adapter(out, round_, seed=1) -> model version`, for the hot-swap tests of the
    node and the broker."""
    return _write_adapter
