"""Tracklet memories a label-free node may share through the server (`share-memories`).

Seed paper 004 lets devices exchange feature vectors, never images, so that a person seen
at two sites can be linked. Here a node that opts in adds its tracklet memories to its
train reply; the server keeps each node's latest and forwards the others' to every node in
the next round, where they take part in the node's cross-camera links
(`edge_node.fl.mining.mine_identities`) and in its loss as fixed keys
(`common.self_train`). What travels per memory: one unit appearance vector (float16), the
visit's first and last timestamp, and an opaque camera key; no image, crop, caption,
camera name or node name. A memory is still a person's appearance feature at a time and a
place: docs/label-free.md says what that exposes and why it is off by default.

This module is the wire contract both sides check: a malformed record from a node is
dropped by the server (its adapter update still counts) and one from the server is refused
by the node, with what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from common.errors import AdapterMismatch

REPLY_RECORD = "memories"  # ArrayRecord in a train reply: this node's memories
SHARED_RECORD = "shared-memories"  # ArrayRecord in a train message: the other nodes'
MAX_MEMORIES = 50_000  # per node and round; more is refused, not truncated
CAMERA_STRIDE = 1_000  # forwarded camera key = source index * stride + the node's camera slot
KEYS = ("vectors", "cameras", "spans")


@dataclass(frozen=True)
class SharedMemories:
    """`vectors` (M, D) unit rows, `cameras` (M,) int64 opaque keys, `spans` (M, 2) int64
    first and last timestamp (ms) of each visit."""

    vectors: np.ndarray
    cameras: np.ndarray
    spans: np.ndarray

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in to_arrays(self).values())


def to_arrays(memories: SharedMemories) -> dict[str, np.ndarray]:
    """The arrays of an ArrayRecord (vectors as float16: half the bytes, cosine to ~1e-3)."""
    return {
        "vectors": np.ascontiguousarray(memories.vectors, dtype=np.float16),
        "cameras": np.ascontiguousarray(memories.cameras, dtype=np.int64),
        "spans": np.ascontiguousarray(memories.spans, dtype=np.int64),
    }


def from_arrays(
    arrays: Mapping[str, np.ndarray],
    *,
    dim: int | None = None,
    camera_slots: bool = False,
    where: str = "memories",
) -> SharedMemories:
    """Check and unpack; AdapterMismatch names the first thing wrong. `camera_slots`: a
    node's own reply, whose camera keys are slots in [0, CAMERA_STRIDE)."""
    if sorted(arrays) != sorted(KEYS):
        raise AdapterMismatch(f"{where}: expected arrays {list(KEYS)}, got {sorted(arrays)}")
    vectors = np.asarray(arrays["vectors"])
    cameras, spans = np.asarray(arrays["cameras"]), np.asarray(arrays["spans"])
    if vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise AdapterMismatch(f"{where}: vectors must be a float (M, D) array, got {vectors.shape}")
    m = len(vectors)
    if m > MAX_MEMORIES:
        raise AdapterMismatch(f"{where}: {m} memories, at most {MAX_MEMORIES} per node")
    if dim is not None and vectors.shape[1] != dim:
        raise AdapterMismatch(f"{where}: vectors have {vectors.shape[1]} dims, the model {dim}")
    if cameras.shape != (m,) or cameras.dtype.kind not in "iu":
        raise AdapterMismatch(f"{where}: cameras must be {m} integers, got {cameras.shape}")
    if m and (cameras.min() < 0 or (camera_slots and cameras.max() >= CAMERA_STRIDE)):
        raise AdapterMismatch(f"{where}: camera keys out of range ({cameras.min()}..)")
    if spans.shape != (m, 2) or spans.dtype.kind not in "iu":
        raise AdapterMismatch(f"{where}: spans must be ({m}, 2) integers, got {spans.shape}")
    if m and (spans[:, 0] > spans[:, 1]).any():
        raise AdapterMismatch(f"{where}: a visit ends before it starts")
    vectors = vectors.astype(np.float32)
    if not np.isfinite(vectors).all():
        raise AdapterMismatch(f"{where}: vectors hold NaN or infinity")
    norms = np.linalg.norm(vectors, axis=1)
    if m and (np.abs(norms - 1) > 0.01).any():
        raise AdapterMismatch(f"{where}: vectors must be unit length (norms {norms.min():.3g}..)")
    return SharedMemories(vectors, cameras.astype(np.int64), spans.astype(np.int64))


def to_record(memories: SharedMemories) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in to_arrays(memories).items()})


def from_record(record: ArrayRecord, **checks) -> SharedMemories:
    """`from_arrays` of a received ArrayRecord (same `dim`, `camera_slots`, `where`)."""
    return from_arrays({k: a.numpy() for k, a in record.items()}, **checks)


def pool(sources: Sequence[tuple[int, SharedMemories]]) -> SharedMemories | None:
    """The memories of several sources as one set, each source's camera slots made distinct
    (key = source * CAMERA_STRIDE + slot); None when there is nothing to forward."""
    parts = [(s, m) for s, m in sources if len(m)]
    if not parts:
        return None
    return SharedMemories(
        np.concatenate([m.vectors for _, m in parts]).astype(np.float32),
        np.concatenate([m.cameras + s * CAMERA_STRIDE for s, m in parts]),
        np.concatenate([m.spans for _, m in parts]),
    )
