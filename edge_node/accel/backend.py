"""Embedding backends: the one seam between the node and whatever runs the model.

Why a seam: on a laptop the node runs PyTorch eager; on a Jetson the same daemon runs an
ONNX Runtime or TensorRT export of the same merged model. The node only needs
`encode_text`, `encode_images`, `version`, `query_version`, `embed_dim`, `text_tower` and a
`name`, so a
backend is any object with those, made by the module that `edge_node.accel.registry` names
for the config's `backend` key. One backend object per (model, adapter) pair lives in a
process; the service and the indexer share it.

A backend loaded with `text_tower=False` (a vector-only node, `text-tower = false`) holds
no text tower, no tokenizer and no text graph; its `encode_text` raises TextTowerAbsent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from common.errors import AdapterMismatch, TextTowerAbsent
from edge_node.accel.registry import backend_module


class EmbeddingBackend(Protocol):
    """What the node needs from a model. Outputs are float32 (n, embed_dim), L2-normalised."""

    name: str  # "torch", "onnxruntime", ...
    version: str  # identical on every machine for the same base + adapter
    # the version whose query vectors are valid here: a distilled student's teacher's
    # (model dir's `teacher`, or an export manifest's `query_version`), else `version`
    query_version: str
    adapter_version: str  # "" for the base model
    embed_dim: int
    note: str  # shown in Status, e.g. "onnx export pending, serving with torch"
    text_tower: bool  # False: loaded without the text tower; encode_text raises

    def encode_text(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...


BackendLoader = Callable[..., EmbeddingBackend]  # (model_spec, adapter, device, *, text_tower)


def no_text_tower(backend: str) -> TextTowerAbsent:
    """The error `encode_text` raises on a backend loaded without its text tower."""
    return TextTowerAbsent(
        f"backend {backend!r} was loaded without its text tower (text-tower = false): "
        "it embeds images only"
    )


PROBE_TEXT = "a person in a red jacket"


def probe_crop() -> Image.Image:
    """A small synthetic person-sized crop (deterministic): what the image probe embeds."""
    h, w = 64, 32
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _probe_problem(out: np.ndarray, embed_dim: int) -> str:
    """Why the probe output `out` is unusable ("" when it is a unit row of `embed_dim`)."""
    out = np.asarray(out)
    if out.shape != (1, embed_dim):
        return f"shape {out.shape}, expected (1, {embed_dim})"
    if not np.isfinite(out).all():
        return f"{int((~np.isfinite(out)).sum())} of {embed_dim} values are NaN or inf"
    norm = float(np.linalg.norm(out.astype(np.float64)))
    if not 0.9 <= norm <= 1.1:
        return f"L2 norm {norm:.3g}, expected 1 (embeddings must be normalised)"
    return ""


def probe_backend(instance: EmbeddingBackend, what: str) -> None:
    """Embed one text and one synthetic crop; raise AdapterMismatch naming the tower whose
    output is not a finite unit vector. Both towers: an adapter can break either one alone
    (huge image-tower weights gave NaN image embeddings while text embeddings were fine).
    A backend without its text tower is probed on the image tower only."""
    towers = [("image", lambda: instance.encode_images([probe_crop()]))]
    if instance.text_tower:
        towers.insert(0, ("text", lambda: instance.encode_text([PROBE_TEXT])))
    for tower, run in towers:
        problem = _probe_problem(run(), instance.embed_dim)
        if problem:
            raise AdapterMismatch(
                f"{what} on backend {instance.name!r}: the {tower} tower's probe embedding is "
                f"invalid ({problem}); refusing it"
            )


def load_backend(
    backend: str,
    model_spec: str,
    adapter: Path | None = None,
    device: str = "cpu",
    *,
    text_tower: bool = True,
) -> EmbeddingBackend:
    """Build and sanity-check a backend; a model that yields wrong or non-finite embeddings
    on either tower is refused here, before it can reach an index (for every backend,
    exports included: the probe runs through the backend's own encode_text/encode_images).
    `text_tower=False` loads the image tower only (a vector-only node)."""
    instance = backend_module(backend).load(model_spec, adapter, device, text_tower=text_tower)
    what = f"model {model_spec!r} with adapter {adapter}" if adapter else f"model {model_spec!r}"
    probe_backend(instance, what)
    return instance
