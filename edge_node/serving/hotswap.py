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

from common.adapters import AdapterCandidate, latest_adapter, read_candidate

__all__ = ["AdapterCandidate", "latest_adapter", "read_candidate"]
