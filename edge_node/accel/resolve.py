"""The node's accelerated backends: find (or build) the export that matches what it serves.

The node config says `backend = "torch" | "onnxruntime" | "tensorrt" | "cuda"` and `model`,
and the adapter comes from the adapter dir. For onnxruntime and tensorrt, `model` is either

* an export directory (`fedretrieve export ... --out DIR`): used as is, after checking its
  manifest against the node's current adapter; an adapter the export was not made with is
  refused (AdapterMismatch), so a hot swap to it keeps the old generation serving until
  someone re-exports; or
* a model spec (config name, model directory, hf:<id>): the loader exports the merged
  model into a cache keyed by its version (`<cache>/<version>/<format>-<precision>`) or
  reuses a matching export there. A hot swap therefore re-exports in the swap thread while
  the previous generation keeps serving, and Status's `backend_note` says which export runs.

`LOADERS` maps each backend name to `loader(model_spec, adapter_dir, device)`, the seam in
`edge_node.accel.backend`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from common.errors import FedRetrieveError

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/fedretrieve/exports")


def resolve_export(
    model_spec: str,
    adapter: Path | None,
    *,
    fmt: str,
    precision: str,
    cache_root: Path | None = None,
) -> tuple[Path, str]:
    """(export dir, how it was obtained) for the node's model spec and adapter."""
    from edge_node.accel.backend import adapter_version_of
    from edge_node.accel.export import MANIFEST_FILE, export_model, open_export

    adapter_version = adapter_version_of(adapter)
    given = Path(str(model_spec)).expanduser()
    if (given / MANIFEST_FILE).is_file():
        open_export(given, adapter_version=adapter_version, fmt=fmt)
        return given, "pre-built export"
    from common.factory import create_model

    model = create_model(model_spec, adapter=adapter)
    slug = re.sub(r"[^A-Za-z0-9_.@+-]", "_", model.version)
    target = (cache_root or DEFAULT_CACHE).expanduser() / slug / f"{fmt}-{precision}"
    try:
        open_export(target, model_version=model.version, adapter_version=adapter_version, fmt=fmt)
        return target, "cached export"
    except FedRetrieveError as err:
        log.info("exporting %s for %s (%s)", fmt, model.version, err)
    export_model(
        model, target, model_spec=str(model_spec), adapter_version=adapter_version,
        fmt=fmt, precision=precision,
    )  # fmt: skip
    return target, "exported at load"


def load_onnxruntime(model_spec: str, adapter: Path | None = None, device: str = "cpu"):
    from edge_node.accel.backend import adapter_version_of
    from edge_node.accel.ort import OrtBackend

    path, how = resolve_export(model_spec, adapter, fmt="onnx", precision="fp32")
    backend = OrtBackend(path, adapter_version=adapter_version_of(adapter))
    backend.note = f"onnxruntime {backend.precision}, {how}: {path}"
    return backend


def load_tensorrt(model_spec: str, adapter: Path | None = None, device: str = "cuda:0"):
    from edge_node.accel.backend import adapter_version_of
    from edge_node.accel.trt import TrtBackend, import_tensorrt

    import_tensorrt()  # fail fast, with the install steps, before exporting anything
    path, how = resolve_export(model_spec, adapter, fmt="tensorrt", precision="fp16")
    backend = TrtBackend(path, adapter_version=adapter_version_of(adapter), device=device)
    backend.note = f"tensorrt {backend.manifest.precision}, {how}: {path}"
    return backend


def load_cuda(model_spec: str, adapter: Path | None = None, device: str = "cuda"):
    from edge_node.accel.cuda import CudaBackend

    return CudaBackend.load(model_spec, adapter, device)


LOADERS = {"onnxruntime": load_onnxruntime, "tensorrt": load_tensorrt, "cuda": load_cuda}
