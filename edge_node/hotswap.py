"""Which adapter in the adapter dir should be active: discovery only, no model code.

Why separate: the rule for "a new adapter appeared" must be simple enough to explain to
the person copying files by hand, and testable without a model. The rule:

* `adapter-dir` itself may be an adapter (it holds `fedretrieve_adapter.json`), replaced in
  place by `common.adapters.save_adapter` (which renames a complete directory over it);
* or it holds adapters as sub-directories (`round-3/`, `2024-06-01/`, ...). Names starting
  with "." are ignored (that is where `save_adapter` stages its temporary copies).

The newest candidate wins: highest manifest `round`, then latest manifest mtime, then name.
An adapter is identified by (path, adapter fingerprint), so replacing one in place with new
weights counts as new. A candidate the node refused is not retried until it changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import AdapterMismatch

MANIFEST_FILE = "fedretrieve_adapter.json"


@dataclass(frozen=True)
class AdapterCandidate:
    path: Path
    fingerprint: str  # adapter weights hash from the manifest
    round: int  # -1 when the manifest has none
    mtime_ns: int

    @property
    def key(self) -> tuple[str, str]:
        return (str(self.path), self.fingerprint)


def read_candidate(path: Path) -> AdapterCandidate | None:
    """The candidate at `path`, or None if it is not (or no longer) a complete adapter."""
    from common.adapters import read_manifest

    manifest_path = path / MANIFEST_FILE
    try:
        mtime = manifest_path.stat().st_mtime_ns
        manifest = read_manifest(path)
    except (FileNotFoundError, AdapterMismatch):
        return None
    round_ = manifest.round if manifest.round is not None else -1
    return AdapterCandidate(path, manifest.adapter_fingerprint, int(round_), mtime)


def latest_adapter(adapter_dir: Path | None) -> AdapterCandidate | None:
    """The adapter the node should be running according to the rule above."""
    if adapter_dir is None or not adapter_dir.is_dir():
        return None
    if (adapter_dir / MANIFEST_FILE).exists():
        return read_candidate(adapter_dir)
    candidates = []
    for sub in adapter_dir.iterdir():
        if sub.name.startswith(".") or not sub.is_dir():
            continue
        candidate = read_candidate(sub)
        if candidate is not None:
            candidates.append(candidate)
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c.round, c.mtime_ns, c.path.name))
