"""Find (or build) the export that matches what a node serves.

The node config says `backend` and `model`, and the adapter comes from the adapter dir.
For a backend that runs an export (onnxruntime, tensorrt), `model` is either

* an export directory (`fedretrieve export ... --out DIR`): used as is, after checking its
  manifest against the node's current adapter; an adapter the export was not made with is
  refused (AdapterMismatch), so a hot swap to it keeps the old generation serving until
  someone re-exports; or
* a model spec (config name, model directory, hf:<id>): the model is exported into a cache
  keyed by its version (`<cache>/<version>/<format>-<precision>`), or a matching export
  there is reused. A hot swap therefore re-exports in the swap thread while the previous
  generation keeps serving, and Status's `backend_note` says which export runs.

The model factory and the exporter (torch) are imported only to build or look up an
export from a model spec: a node serving a pre-built export never imports torch.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from common.adapters import adapter_version_of
from common.errors import FedRetrieveError
from edge_node.accel.manifest import MANIFEST_FILE, open_export

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
    adapter_version = adapter_version_of(adapter)
    given = Path(str(model_spec)).expanduser()
    if (given / MANIFEST_FILE).is_file():
        open_export(given, adapter_version=adapter_version, fmt=fmt)
        return given, "pre-built export"
    from common.factory import create_model
    from edge_node.accel.export import export_model

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
