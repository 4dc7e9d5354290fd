"""The `onnxruntime` embedding backend: runs an export directory on CPU (or any ORT provider).

Same interface as `edge_node.accel.eager.TorchBackend` (encode_text, encode_images, version,
adapter_version, embed_dim, name, note), same preprocessing (the manifest's PreprocessCfg)
and the same tokenizer (saved inside the export), so its embeddings match torch eager to
cosine >= 0.9999 in fp32 (tests/edge_node/test_export.py).

With `text_tower=False` (a vector-only node) neither the text graph nor the tokenizer is
loaded. Serving a pre-built export imports no torch (preprocessing is numpy's
`common.preprocess.to_pixels`; `resolve` imports the exporter only to build an export).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.adapters import adapter_version_of
from common.preprocess import PreprocessCfg, to_pixels
from edge_node.accel.backend import no_text_tower
from edge_node.accel.manifest import ExportManifest, open_export
from edge_node.accel.resolve import resolve_export


class OrtBackend:
    name = "onnxruntime"

    def __init__(
        self,
        export_dir: str | Path,
        *,
        model_version: str | None = None,
        adapter_version: str | None = None,
        threads: int = 0,
        batch_size: int = 8,
        providers: list[str] | None = None,
        note: str = "",
        text_tower: bool = True,
    ) -> None:
        """`model_version`/`adapter_version`: what the node runs; a mismatching export is
        refused (AdapterMismatch). `threads` 0 lets ORT use every core. `batch_size` 8:
        on 2 CPU cores, batches of 8 ran as fast or faster per item than 32 for both the
        default CNN and ViT-B/16 (activations stay in cache; `fedretrieve bench embed`).
        `text_tower` False: no text session and no tokenizer (`encode_text` raises)."""
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.manifest: ExportManifest = open_export(
            self.export_dir,
            model_version=model_version,
            adapter_version=adapter_version,
            fmt="onnx",
        )
        m = self.manifest
        self.version = m.model_version
        self.query_version = m.query_version
        self.adapter_version = m.adapter_version
        self.embed_dim = m.embed_dim
        self.precision = m.precision
        self.note = note or f"onnxruntime {m.precision} export {self.export_dir}"
        self.batch_size = batch_size
        self.preprocess = PreprocessCfg.from_dict(m.preprocess)
        self.text_tower = text_tower
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # ORT warns about unused initialisers after quantisation
        providers = providers or ["CPUExecutionProvider"]
        self._image = ort.InferenceSession(
            str(self.export_dir / m.graphs["image"]), opts, providers=providers
        )
        self.tokenizer = self._text = None
        if text_tower:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.export_dir / "tokenizer"))
            self._text = ort.InferenceSession(
                str(self.export_dir / m.graphs["text"]), opts, providers=providers
            )

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            raise no_text_tower(self.name)
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.manifest.text_max_length,
            return_tensors="np",
        )
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    def encode_text(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        if self._text is None:
            raise no_text_tower(self.name)
        out = [np.empty((0, self.embed_dim), np.float32)]
        for i in range(0, len(texts), self.batch_size):
            feeds = self.tokenize(texts[i : i + self.batch_size])
            out.append(self._text.run(None, feeds)[0])
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) float32 normalised pixels -> (n, D) unit rows."""
        out = [np.empty((0, self.embed_dim), np.float32)]
        for i in range(0, len(pixels), self.batch_size):
            batch = np.ascontiguousarray(pixels[i : i + self.batch_size], dtype=np.float32)
            out.append(self._image.run(None, {"pixels": batch})[0])
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        out = [np.empty((0, self.embed_dim), np.float32)]
        for i in range(0, len(images), self.batch_size):
            pixels = to_pixels(list(images[i : i + self.batch_size]), self.preprocess)
            out.append(self.encode_pixels(pixels))
        return np.concatenate(out)


def load(
    model_spec: str, adapter: Path | None = None, device: str = "cpu", *, text_tower: bool = True
) -> OrtBackend:
    path, how = resolve_export(model_spec, adapter, fmt="onnx", precision="fp32")
    backend = OrtBackend(path, adapter_version=adapter_version_of(adapter), text_tower=text_tower)
    backend.note = f"onnxruntime {backend.precision}, {how}: {path}"
    return backend
