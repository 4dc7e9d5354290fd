"""One model, the crop normalisation it was fed, and the index they built, as one value.

Why "generation": a query must be encoded by the same model that embedded the gallery it
is searched against. The active `Generation` bundles one backend with the index that this
backend built, and a search reads the node's active generation once, so everything it does
uses one pair. A hot swap builds a complete new generation off to the side (re-embedding
the gallery with the new model) and then replaces the reference in one assignment; there
is no moment when a query sees a new text encoder with an old index or the other way round.

The per-camera colour gains (`[camera-norm]`, `common.camera_norm.CameraNorm`) belong to
the same value: the index holds vectors of crops normalised with exactly these gains, and
a crop embedded later for it (top-up, find similar) must be normalised the same way. New
gains mean a new generation, built and swapped like a new adapter. They change only the
image side, so the model version (what a query vector must match) stays the backend's;
the index version names both (`index_version`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.adapters import AdapterCandidate
from common.camera_norm import CameraNorm
from edge_node.accel.backend import EmbeddingBackend

from .indexer import VectorIndex

BackendFactory = Callable[[Path | None], EmbeddingBackend]


def index_version(model_version: str, norm: CameraNorm) -> str:
    """What an index built by `model_version` from crops normalised with `norm` is called:
    the model version alone without gains (the vectors are the plain model's), else
    `<model version>+<norm version>`."""
    return f"{model_version}+{norm.version}" if norm.gains else model_version


@dataclass(frozen=True)
class Generation:
    """One model, its crop normalisation and the index they built; only ever used together."""

    backend: EmbeddingBackend
    index: VectorIndex
    adapter: AdapterCandidate | None
    norm: CameraNorm = field(default_factory=CameraNorm)  # no gains: crops as they are

    def __post_init__(self) -> None:
        expected = index_version(self.backend.version, self.norm)
        if self.index.version != expected:
            raise ValueError(f"index version {self.index.version!r} is not {expected!r}")

    @property
    def version(self) -> str:
        """The model version: what query vectors and hits are stamped with."""
        return self.backend.version

    @property
    def query_version(self) -> str:
        """The other version whose query vectors search this index: a distilled student's
        teacher's (equal to `version` for an ordinary model, and for a backend that
        predates the attribute)."""
        return getattr(self.backend, "query_version", "") or self.backend.version
