"""Export a (LoRA-merged) DualEncoder as two ONNX graphs plus a manifest.

Why: embedding the gallery is the node's heaviest work. ONNX Runtime (CPU nodes) and
TensorRT (Jetsons) run the same graphs much faster than PyTorch eager, but only if the
graphs are exactly the model the node is supposed to serve: what an export directory
holds, and how a node checks it, is `edge_node.accel.manifest`. A format that needs a
step after the ONNX graphs (TensorRT builds engines) names it in its backend module
(`finish_export`), found through `edge_node.accel.registry`.

The text graph pools CLIP towers at the end-of-text token with a float one-hot built from
the attention mask (position = mask length - 1), not with transformers' int64 ArgMax over
the token ids, which TensorRT does not support; this is exact for right-padded batches,
which is what our tokenizers produce (the parity tests check it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.adapters import replace_dir
from common.errors import AdapterMismatch, ConfigError
from edge_node.accel.manifest import (
    DEFAULT_OPSET,
    EXPORTERS,
    IMAGE_INPUTS,
    MANIFEST_FILE,
    OUTPUT,
    PRECISIONS,
    TEXT_INPUTS,
    ExportManifest,
    sha256_of,
)
from edge_node.accel.quantize import quantize_export
from edge_node.accel.registry import EXPORT_FORMATS, format_module


# ---------------------------------------------------------------------- graphs
class ImageGraph(nn.Module):
    """Normalised pixels -> unit-length embeddings: exactly `DualEncoder.encode_image`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.image_features(pixels), dim=-1)


class TextGraph(nn.Module):
    """Token ids + mask -> unit-length embeddings: exactly `DualEncoder.encode_text`, with
    CLIP's end-of-text pooling rewritten as a float one-hot matmul (TensorRT-friendly)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.tower = model.text_tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.tower.pooling == "pooler":
            hidden = self.tower.model(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            mask = attention_mask.to(hidden.dtype)
            eos = mask.sum(dim=1, keepdim=True) - 1.0  # (b, 1) last real token
            positions = torch.arange(hidden.shape[1], device=hidden.device).to(hidden.dtype)
            onehot = (positions.unsqueeze(0) == eos).to(hidden.dtype)  # (b, seq)
            pooled = torch.matmul(onehot.unsqueeze(1), hidden).squeeze(1)
        else:
            pooled = self.tower(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.model.text_proj(pooled), dim=-1)


def export_onnx_graphs(
    model: nn.Module,
    out_dir: Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
    towers: Sequence[str] = ("image", "text"),
) -> dict[str, str]:
    """Write image.onnx and text.onnx (fp32, dynamic batch; text also dynamic length)."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"`exporter` must be one of {EXPORTERS}, got {exporter!r}")
    if opset < 17:
        raise ConfigError(f"`opset` must be >= 17 (native LayerNormalization), got {opset}")
    model = model.eval().float().cpu()
    h, w = model.preprocess.size
    pixels = torch.randn(2, 3, h, w)
    tokens = model.text_tower.tokenize(["a person", "a person in a red jacket and black cap"])
    specs = {
        "image": (ImageGraph(model), (pixels,), IMAGE_INPUTS, {"pixels": {0: "batch"}}),
        "text": (
            TextGraph(model),
            (tokens["input_ids"], tokens["attention_mask"]),
            TEXT_INPUTS,
            {name: {0: "batch", 1: "seq"} for name in TEXT_INPUTS},
        ),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for tower in towers:
        module, args, inputs, axes = specs[tower]
        module.eval()
        path = out_dir / f"{tower}.onnx"
        with torch.no_grad():
            _export_one(module, args, path, inputs, axes, opset, exporter)
        written[tower] = path.name
    return written


def _export_one(module, args, path: Path, inputs, axes, opset: int, exporter: str) -> None:
    import warnings

    kwargs = dict(input_names=list(inputs), output_names=[OUTPUT], opset_version=opset)
    if exporter == "dynamo":
        dims = {}
        for name, spec in axes.items():
            dims[name] = {i: torch.export.Dim(f"{label}") for i, label in spec.items()}
        torch.onnx.export(
            module, args, str(path), dynamo=True, external_data=False, verbose=False,
            dynamic_shapes=tuple(dims[name] for name in inputs), **kwargs,
        )  # fmt: skip
        return
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated upstream but
        warnings.simplefilter("ignore", DeprecationWarning)  # 50x faster and TensorRT-proven
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, str(path), dynamo=False, dynamic_axes=axes, **kwargs)


# ---------------------------------------------------------------------- export
def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    model_spec: str,
    adapter_version: str = "",
    fmt: str = "onnx",
    precision: str = "fp32",
    max_batch: int = 32,
    calib_images: Sequence[Image.Image] | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
    quantize_text: bool = False,
    build_engines: Callable[[Path, ExportManifest], dict[str, str]] | None = None,
) -> ExportManifest:
    """Export `model` (adapter already merged) into `out_dir`, which appears whole or not
    at all (written in a temporary sibling, then renamed), so a node never loads half an
    export. INT8: the image graph is statically quantised on `calib_images` (gallery
    crops) when given and convolutional, dynamically otherwise; the text graph stays fp32
    unless `quantize_text` (it cost Rank-1 points; see edge_node.accel.quantize)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"`format` must be one of {EXPORT_FORMATS}, got {fmt!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
    if fmt == "onnx" and precision == "fp16":
        raise ConfigError("`precision` fp16 needs --format tensorrt (or the cuda backend)")
    if max_batch < 1:
        raise ConfigError(f"`max-batch` must be >= 1, got {max_batch}")
    if hasattr(model, "peft_config"):
        raise AdapterMismatch("export takes a merged DualEncoder (create_model(..., adapter=))")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        graphs = export_onnx_graphs(model, tmp, opset=opset, exporter=exporter)
        quant = {}
        if precision == "int8":
            quant = quantize_export(
                tmp,
                graphs,
                model.preprocess,
                calib_images,
                symmetric=(fmt == "tensorrt"),
                text=quantize_text,
            )
        model.text_tower.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        manifest = ExportManifest(
            format=fmt,
            precision=precision,
            model_spec=str(model_spec),
            model_name=str(model.name),
            model_version=str(model.version),
            query_version=str(model.query_version),
            adapter_version=adapter_version,
            embed_dim=int(model.embed_dim),
            preprocess=model.preprocess.to_dict(),
            text_max_length=int(model.text_tower.max_length),
            max_batch=int(max_batch),
            opset=opset,
            exporter=exporter,
            graphs=graphs,
            quantization=quant,
            tools=_tool_versions(),
        )
        finish = getattr(format_module(fmt), "finish_export", None)
        if finish is not None:
            finish = build_engines or finish  # tests build stand-in engines without TensorRT
            manifest = _replace(manifest, graphs=finish(tmp, manifest))
        manifest = _replace(manifest, files=_checksums(tmp))
        (tmp / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace(manifest: ExportManifest, **changes) -> ExportManifest:
    return ExportManifest(**{**asdict(manifest), **changes})


def _checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_of(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def _tool_versions() -> dict[str, str]:
    import onnx
    import transformers

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    versions["transformers"] = transformers.__version__
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # an export machine need not run ORT itself
        pass
    return versions


def load_calibration_images(calib_dir: str | Path, limit: int = 256) -> list[Image.Image]:
    """Up to `limit` crops from a folder tree (evenly spread over the sorted file list):
    static INT8 scales should come from what the node's cameras actually see."""
    from common.preprocess import load_image

    root = Path(calib_dir)
    if not root.is_dir():
        raise ConfigError(f"--calib-data {root}: not a directory of images")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())
    if not files:
        raise ConfigError(f"--calib-data {root}: no .jpg/.png images found")
    step = max(1, len(files) // limit)
    return [load_image(p) for p in files[::step][:limit]]
