"""Adapter directories: PEFT's own format plus our manifest, written atomically.

`adapter_config.json` + `adapter_model.safetensors` are what `PeftModel.from_pretrained`
reads; `fedretrieve_adapter.json` records which base model the adapter belongs to (name and
weights fingerprint), the federated round and the peft version, nanoGPT-style, so a node
refuses an adapter made for another base instead of serving garbage.

Finding and reading adapters (manifests, `latest_adapter`) needs no model code: peft and
torch are imported by `save_adapter` and `load_adapter` only, so a node serving an export
(onnxruntime) watches its adapter dir without importing torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import AdapterMismatch

if TYPE_CHECKING:
    from peft import PeftModel

    from common.model import DualEncoder

MANIFEST_FILE = "fedretrieve_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class AdapterManifest:
    base_name: str
    base_fingerprint: str
    base_version: str
    adapter_fingerprint: str
    peft_version: str
    round: int | None = None
    lora: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        """The version string nodes and broker compare: base plus adapter weights."""
        return f"{self.base_version}+{self.adapter_fingerprint[:10]}"

    @property
    def adapter_version(self) -> str:
        return self.adapter_fingerprint[:10]


def save_adapter(
    peft_model: PeftModel,
    out_dir: str | Path,
    *,
    round: int | None = None,
    extra: dict | None = None,
) -> AdapterManifest:
    """Write the adapter into `out_dir` so that it appears whole or not at all.

    Everything is written into a temporary sibling directory, fsynced, then renamed into
    place; a watcher that sees `out_dir` therefore always sees a complete adapter.
    """
    import peft

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    base: DualEncoder = peft_model.get_base_model()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        peft_model.save_pretrained(tmp)
        digest = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()
        settings = getattr(peft_model, "fedretrieve_lora", None)
        manifest = AdapterManifest(
            base_name=base.name,
            base_fingerprint=base.fingerprint,
            base_version=base.version,
            adapter_fingerprint=digest,
            peft_version=peft.__version__,
            round=round,
            lora=settings.to_dict() if settings else {},
            extra=dict(extra or {}),
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
        for path in tmp.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def replace_dir(src: Path, dst: Path) -> None:
    """Put the complete directory `src` at `dst`, never leaving `dst` half-written."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_manifest(adapter_dir: str | Path) -> AdapterManifest:
    path = Path(adapter_dir)
    for name in (PEFT_CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
        if not (path / name).is_file():
            raise AdapterMismatch(f"{path} is not a fedretrieve adapter: {name} is missing")
    try:
        data = json.loads((path / MANIFEST_FILE).read_text())
        return AdapterManifest(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise AdapterMismatch(f"{path / MANIFEST_FILE}: unreadable manifest ({err})") from err


def adapter_version_of(adapter_dir: str | Path | None) -> str:
    """The adapter's short fingerprint from its manifest ("" for the base model): the same
    on every node that holds the same weights, so versions compare across the fleet."""
    if adapter_dir is None:
        return ""
    return read_manifest(adapter_dir).adapter_version


def load_adapter(
    model: DualEncoder, adapter_dir: str | Path, *, trainable: bool = False
) -> PeftModel:
    """Attach the adapter in `adapter_dir` to `model`, refusing one made for another base."""
    import safetensors
    import safetensors.torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    path = Path(adapter_dir)
    manifest = read_manifest(path)
    if manifest.base_fingerprint != model.fingerprint:
        raise AdapterMismatch(
            f"adapter {path} was trained on base {manifest.base_version!r}; this model is "
            f"{model.version!r} (load the matching base model or retrain the adapter)"
        )
    weights = (path / WEIGHTS_FILE).read_bytes()
    if hashlib.sha256(weights).hexdigest() != manifest.adapter_fingerprint:
        raise AdapterMismatch(
            f"adapter {path}: weights do not match the manifest checksum "
            "(partially copied or modified after saving)"
        )
    try:
        saved = safetensors.torch.load(weights)
    except (safetensors.SafetensorError, ValueError, OSError) as err:
        raise AdapterMismatch(f"adapter {path}: {WEIGHTS_FILE} is unreadable ({err})") from err
    try:
        # mismatched sizes are left to the layout check below, which names them all in one line
        peft_model = PeftModel.from_pretrained(
            model, str(path), is_trainable=trainable, ignore_mismatched_sizes=True
        )
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterMismatch(
            f"adapter {path} does not fit model {model.version!r}: {first}"
        ) from err
    from common.lora import LoraSettings, check_adapter_state

    # The expected layout: this base model wrapped with the adapter's own LoraConfig (what
    # PEFT just built). The saved tensors must match it key for key, in shape and dtype, and
    # be finite; PEFT itself only warns about missing keys and leaves those at their init.
    expected = get_peft_model_state_dict(peft_model)
    check_adapter_state(expected, saved, where=f"adapter {path}")
    if manifest.lora:
        peft_model.fedretrieve_lora = LoraSettings.from_spec(manifest.lora)
    peft_model.fedretrieve_manifest = manifest
    return peft_model


# ------------------------------------------------------------------ which adapter is current
@dataclass(frozen=True)
class AdapterCandidate:
    """A complete adapter found in a watched directory."""

    path: Path
    fingerprint: str  # adapter weights hash from the manifest
    round: int  # -1 when the manifest has none
    mtime_ns: int

    @property
    def key(self) -> tuple[str, str]:
        return (str(self.path), self.fingerprint)


FilesStamp = tuple[tuple[str, int, int], ...]


def files_stamp(path: Path) -> FilesStamp:
    """(name, size, mtime_ns) of every file in the adapter directory `path`, sorted.

    What "this adapter changed" means for a refused one: a directory completed in place
    (a `cp -r` that wrote the manifest first, then the weights) has the same manifest
    fingerprint before and after, but not the same files. () when `path` cannot be read.
    """
    stamp = []
    try:
        for sub in sorted(path.rglob("*")):
            with contextlib.suppress(FileNotFoundError):
                st = sub.stat()
                if sub.is_file():
                    stamp.append((str(sub.relative_to(path)), st.st_size, st.st_mtime_ns))
    except OSError:
        return ()
    return tuple(stamp)


def read_candidate(path: Path) -> AdapterCandidate | None:
    """The candidate at `path`, or None if it is not (or no longer) a complete adapter."""
    try:
        mtime = (path / MANIFEST_FILE).stat().st_mtime_ns
        manifest = read_manifest(path)
    except (FileNotFoundError, AdapterMismatch):
        return None
    round_ = manifest.round if manifest.round is not None else -1
    return AdapterCandidate(path, manifest.adapter_fingerprint, int(round_), mtime)


def latest_adapter(adapter_dir: str | Path | None) -> AdapterCandidate | None:
    """The adapter a watcher (node daemon, broker) should run: one rule for both.

    `adapter_dir` is an adapter itself (replaced in place by `save_adapter`), or a folder of
    adapters of which the newest wins: highest manifest round, then manifest mtime, then name.
    Names starting with "." are staging copies and are ignored.
    """
    if adapter_dir is None:
        return None
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        return None
    if (adapter_dir / MANIFEST_FILE).exists():
        return read_candidate(adapter_dir)
    candidates = [
        c
        for sub in adapter_dir.iterdir()
        if sub.is_dir() and not sub.name.startswith(".")
        for c in [read_candidate(sub)]
        if c is not None
    ]
    return max(candidates, key=lambda c: (c.round, c.mtime_ns, c.path.name)) if candidates else None
