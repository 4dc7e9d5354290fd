"""Which embedding backends a node can run, by name: the one table to extend.

A backend is a module in this package with `load(model_spec, adapter_dir, device)` that
returns an `EmbeddingBackend` (edge_node.accel.backend). A backend that serves an export
names its `export_format`; that module may also offer `require()` (fail fast, with install
steps, before anything slow) and `finish_export(root, manifest) -> graphs` (a build step
after the ONNX graphs, as TensorRT's engines). Adding a backend (say OpenVINO) is one such
module plus one line in `BACKENDS`; the node config, `fedretrieve export` and the exporter
all read their choices from here.

Modules are imported only when a node or an export asks for them, by name: a Jetson without
onnxruntime or a CI machine without TensorRT never imports what it cannot run, and this
table imports nothing of ours, so no backend can form an import cycle through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from common.errors import ConfigError


@dataclass(frozen=True)
class BackendEntry:
    module: str  # imported when first used
    export_format: str = ""  # the export directory it runs; "" runs the model itself
    precision: str = "fp32"  # precision of the export it builds when given a model spec


BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry("edge_node.accel.eager"),
    "onnxruntime": BackendEntry("edge_node.accel.ort", export_format="onnx"),
    "tensorrt": BackendEntry("edge_node.accel.trt", export_format="tensorrt", precision="fp16"),
    "cuda": BackendEntry("edge_node.accel.cuda"),
}

EXPORT_FORMATS: tuple[str, ...] = tuple(
    dict.fromkeys(e.export_format for e in BACKENDS.values() if e.export_format)
)


def backend_entry(name: str) -> BackendEntry:
    entry = BACKENDS.get(name)
    if entry is None:
        raise ConfigError(
            f"backend {name!r} is not available in this build; available: {', '.join(BACKENDS)}"
        )
    return entry


def backend_module(name: str) -> ModuleType:
    """The module implementing backend `name` (imported now, not at start-up)."""
    return importlib.import_module(backend_entry(name).module)


def format_module(fmt: str) -> ModuleType:
    """The module of the backend that runs exports of format `fmt`."""
    for entry in BACKENDS.values():
        if entry.export_format == fmt:
            return importlib.import_module(entry.module)
    raise ConfigError(f"`format` must be one of {EXPORT_FORMATS}, got {fmt!r}")
