"""One model and the index it built, as one value.

Why "generation": a query must be encoded by the same model that embedded the gallery it
is searched against. The active `Generation` bundles one backend with the index that this
backend built, and a search reads the node's active generation once, so everything it does
uses one pair. A hot swap builds a complete new generation off to the side (re-embedding
the gallery with the new model) and then replaces the reference in one assignment; there
is no moment when a query sees a new text encoder with an old index or the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.adapters import AdapterCandidate
from edge_node.accel.backend import EmbeddingBackend

from .indexer import VectorIndex

BackendFactory = Callable[[Path | None], EmbeddingBackend]


@dataclass(frozen=True)
class Generation:
    """One model and the index it built; only ever used together."""

    backend: EmbeddingBackend
    index: VectorIndex
    adapter: AdapterCandidate | None

    @property
    def version(self) -> str:
        return self.backend.version
