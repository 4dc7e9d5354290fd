"""What an export directory is, and the checks a node runs before it serves one.

Kept apart from the exporter (`edge_node.accel.export`) because the runtime backends
(onnxruntime, TensorRT) only need to read and verify exports: a Jetson that serves a
pre-built export never imports torch.onnx. An export directory holds

    fedretrieve_export.json   manifest: model spec and version, adapter version, the query
                              version (a student's teacher's), input size, normalisation,
                              embedding dim, text length, sha256 of every file
    image.onnx                (batch, 3, H, W) float32 normalised pixels -> (batch, D) unit rows
    text.onnx                 input_ids, attention_mask (batch, seq) int64 -> (batch, D) unit rows
    tokenizer/                the text tower's tokenizer (no hub needed on the node)
    image.plan, text.plan     TensorRT engines (format "tensorrt" only)

and `open_export` refuses a directory whose manifest names another model version or
adapter version, or whose files do not match their checksums.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import AdapterMismatch, ConfigError

MANIFEST_FILE = "fedretrieve_export.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
EXPORTERS = ("torchscript", "dynamo")  # torch.onnx exporters
DEFAULT_OPSET = 18  # >= 17 so LayerNormalization is one native op (ORT and TensorRT)
IMAGE_INPUTS = ("pixels",)
TEXT_INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embeds"  # not "embedding": that name collides with HF module names in the graph


@dataclass(frozen=True)
class ExportManifest:
    """What an export directory holds and which model it is; `check` refuses mismatches."""

    format: str  # "onnx" or "tensorrt"
    precision: str  # fp32 | fp16 | int8
    model_spec: str  # what the exporter was given (config name, model dir, hf:<id>)
    model_name: str
    model_version: str  # DualEncoder.version: base fingerprint (+ adapter fingerprint)
    adapter_version: str  # "" for the base model
    embed_dim: int
    preprocess: dict  # PreprocessCfg.to_dict(): size (H, W), mean, std, resize
    text_max_length: int
    max_batch: int
    opset: int
    exporter: str
    graphs: dict  # {"image": file, "text": file}; engines for tensorrt
    files: dict = field(default_factory=dict)  # relative path -> sha256
    quantization: dict = field(default_factory=dict)  # per tower: mode, calibration images
    tools: dict = field(default_factory=dict)  # library versions that wrote the export
    format_version: int = FORMAT_VERSION
    # whose query vectors the export's index accepts: a distilled student's teacher's
    # version, else model_version. "" (a manifest written before the field) reads as
    # model_version, so older exports load unchanged.
    query_version: str = ""

    def __post_init__(self) -> None:
        if not self.query_version:
            object.__setattr__(self, "query_version", self.model_version)

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.preprocess["size"]
        return int(h), int(w)

    def check(self, *, model_version: str | None, adapter_version: str | None, where: str) -> None:
        """Refuse an export made for another model or adapter (the node calls this)."""
        if model_version is not None and self.model_version != model_version:
            raise AdapterMismatch(
                f"export {where} holds model {self.model_version!r} (spec {self.model_spec!r}); "
                f"this node runs {model_version!r}: re-export with `fedretrieve export "
                "--model SPEC [--adapter DIR]` for the node's model"
            )
        if adapter_version is not None and self.adapter_version != adapter_version:
            have = self.adapter_version or "none (base model)"
            want = adapter_version or "none (base model)"
            raise AdapterMismatch(
                f"export {where} was made with adapter {have}; this node's adapter is {want}: "
                "re-export with the node's current adapter"
            )


def read_manifest(export_dir: str | Path) -> ExportManifest:
    path = Path(export_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(
            f"{export_dir} is not a fedretrieve export ({MANIFEST_FILE} missing); "
            "create one with `fedretrieve export`"
        )
    try:
        data = json.loads(path.read_text())
        manifest = ExportManifest(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable export manifest ({err})") from err
    if manifest.format_version != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: export format {manifest.format_version}, this build reads "
            f"{FORMAT_VERSION}; re-export"
        )
    return manifest


def open_export(
    export_dir: str | Path,
    *,
    model_version: str | None = None,
    adapter_version: str | None = None,
    fmt: str | None = None,
) -> ExportManifest:
    """Read, verify (checksums) and check an export against what the node runs."""
    root = Path(export_dir)
    manifest = read_manifest(root)
    if fmt is not None and manifest.format != fmt:
        raise ConfigError(f"export {root} is format {manifest.format!r}, expected {fmt!r}")
    for rel, digest in manifest.files.items():
        target = root / rel
        if not target.is_file():
            raise AdapterMismatch(f"export {root}: {rel} is missing (incomplete copy?)")
        if sha256_of(target) != digest:
            raise AdapterMismatch(
                f"export {root}: {rel} does not match its manifest checksum "
                "(partially copied or modified after export)"
            )
    manifest.check(model_version=model_version, adapter_version=adapter_version, where=str(root))
    return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
