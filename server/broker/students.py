"""Student nodes: when a distilled student's scores may be merged with the teacher's by score.

A student (common/distill.py) keeps its teacher's text tower and is trained to put crops
where the teacher puts them, so the broker's query vector (made with the global model, the
teacher) searches a student's index, and the node says so: its Status and every answer
carry `query_version` = the teacher's version, while `model_version` is its own. That is a
claim, and merging by score on a claim would let a badly distilled student's inflated
cosines push the teacher nodes' hits out of the top-k; merging by rank fusion instead is
nearly a coin flip at rank 1 between two lists (both first places score 1/61). So the
claim is measured: the broker sends the operator's calibration crops (`[students]
calibration-crops`) through the node's `EmbedImage(image=...)`, embeds the same crops with
its own model's image tower, and takes the mean cosine. At or above `min-agreement` the
student is verified and its answers join the broker's version in the score merge;
otherwise, without crops, or while the probe has not completed, they are fused by rank as
any other version's are, and coverage says why (`StudentCheck`).

When: once per (node, node model version, broker model version), after a health-check
round, on the checking thread, never on the query path. A verdict (verified or not) is
kept for that key; a probe cut short by the transport (UNAVAILABLE, a timeout) or by the
node changing model meanwhile is tried again after the next round. A new global adapter
changes the broker's version, so its students are checked again against it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from common.errors import ConfigError, DatasetError
from common.preprocess import load_image
from protos import broker_pb2, node_pb2
from server.broker.config import StudentSettings, calibration_files
from server.broker.registry import NodeClient, NodeState

log = logging.getLogger(__name__)

# A probe that ends with one of these was cut short, not answered: try again next round.
_RETRY = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)

# (version, (n, d) unit rows) the broker's model gives the calibration crops; None: it cannot
ImageEmbedder = Callable[[list], "tuple[str, np.ndarray] | None"]


@dataclass(frozen=True)
class Verdict:
    """What one calibration probe of one (node, node version, broker version) found."""

    verified: bool
    agreement: float  # mean cosine; 0.0 when not measured
    crops: int
    note: str
    final: bool = True  # False: the probe was cut short; run it again after the next round


def is_student(model_version: str, query_version: str) -> bool:
    """A node is a student when the query vectors it accepts are another model's."""
    return bool(query_version) and query_version != model_version


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine of two (n, d) arrays (rows normalised here, in float64)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


class StudentChecks:
    """The calibration crops, the broker's embeddings of them, and every verdict so far."""

    def __init__(self, settings: StudentSettings) -> None:
        self.settings = settings
        self._crops: list[bytes] = []
        self._images: list = []
        if settings.calibration_crops is not None:
            for path in calibration_files(settings.calibration_crops):
                data = path.read_bytes()
                try:
                    self._images.append(load_image(data))
                except DatasetError as err:
                    raise ConfigError(
                        f"students: `calibration-crops` file {path} is not a readable image ({err})"
                    ) from err
                self._crops.append(data)
        self._lock = threading.Lock()
        self._verdicts: dict[tuple[str, str, str], Verdict] = {}
        self._reference: tuple[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ health-check time
    def verify(
        self, node: NodeClient, known: NodeState, broker_version: str, embed: ImageEmbedder
    ) -> None:
        """Probe `node` if it is a student of the broker's model with no verdict yet."""
        if not self._crops or not known.healthy or not broker_version:
            return
        if not is_student(known.model_version, known.query_version):
            return
        if known.query_version != broker_version:
            return  # a student of another model: nothing to compare with here
        key = (node.id, known.model_version, broker_version)
        with self._lock:
            if key in self._verdicts and self._verdicts[key].final:
                return
        verdict = self._probe(node, known.model_version, broker_version, embed)
        with self._lock:
            self._verdicts[key] = verdict
        log.info(
            "student_check node=%s model=%s teacher=%s verified=%s agreement=%.4f crops=%d %s",
            node.id, known.model_version, broker_version, verdict.verified, verdict.agreement,
            verdict.crops, verdict.note,
        )  # fmt: skip

    def _reference_for(self, broker_version: str, embed: ImageEmbedder) -> np.ndarray | None:
        """The broker's embeddings of the crops, made once per broker model version."""
        ref = self._reference
        if ref is not None and ref[0] == broker_version:
            return ref[1]
        made = embed(self._images)
        if made is None or made[0] != broker_version:
            return None  # no image tower, or the global model changed meanwhile
        self._reference = made
        return made[1]

    def _probe(
        self, node: NodeClient, model_version: str, broker_version: str, embed: ImageEmbedder
    ) -> Verdict:
        n = len(self._crops)
        reference = self._reference_for(broker_version, embed)
        if reference is None:
            return Verdict(False, 0.0, 0, "the broker's model could not embed the crops", False)
        rows = []
        for i, data in enumerate(self._crops):
            try:
                reply = node.stub.EmbedImage(
                    node_pb2.EmbedImageRequest(image=data),
                    timeout=self.settings.probe_timeout_s,
                    metadata=node.metadata(),
                )
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = err.details() if isinstance(err, grpc.Call) else str(err)
                note = f"calibration probe failed at crop {i + 1}/{n}: {code.name} {details}"
                return Verdict(False, 0.0, 0, note, final=code not in _RETRY)
            if reply.vector.model_version != model_version:
                note = f"the node changed model during the probe ({reply.vector.model_version})"
                return Verdict(False, 0.0, 0, note, final=False)
            rows.append(np.asarray(reply.vector.values, dtype=np.float64))
        if any(row.shape != reference[0].shape for row in rows):
            dims = sorted({row.shape[0] for row in rows})
            note = (
                f"the node embeds in {dims} dimensions, the broker's model in {reference.shape[1]}"
            )
            return Verdict(False, 0.0, n, note)
        agreement = mean_cosine(np.stack(rows), reference)
        minimum = self.settings.min_agreement
        if agreement >= minimum:
            return Verdict(True, agreement, n, f"verified: agreement {agreement:.4f} >= {minimum}")
        return Verdict(False, agreement, n, f"not verified: agreement {agreement:.4f} < {minimum}")

    # ------------------------------------------------------------------ query time
    def check_of(
        self, node_id: str, model_version: str, query_version: str, broker_version: str
    ) -> broker_pb2.StudentCheck | None:
        """What coverage says about a node answering with `model_version` that accepts
        queries of `query_version`; None when it is no student."""
        if not is_student(model_version, query_version):
            return None
        check = broker_pb2.StudentCheck(teacher_version=query_version)
        if not broker_version:
            check.note = "not verified: this broker embeds no queries (no `model`)"
        elif query_version != broker_version:
            check.note = f"not verified: a student of {query_version}, not of the broker's model"
        elif not self._crops:
            check.note = "not verified: no [students] calibration-crops in the broker config"
        else:
            with self._lock:
                verdict = self._verdicts.get((node_id, model_version, broker_version))
            if verdict is None:
                check.note = "not verified yet: the calibration probe runs after a health check"
            else:
                check.verified = verdict.verified
                check.agreement = verdict.agreement
                check.crops = verdict.crops
                check.note = verdict.note
        if not check.verified:
            check.note += "; merged by rank fusion"
        return check

    def note_answer(
        self,
        outcome: broker_pb2.NodeOutcome,
        answer: node_pb2.SearchResponse,
        query_version: str,
        vector_version: str,
    ) -> bool:
        """Name a student's answer in its coverage entry (`outcome.student`); True when it
        is merged by score with `vector_version`, the query vector's: verified against
        that model, and it searched that vector rather than encoding the text itself."""
        check = self.check_of(outcome.node_id, answer.model_version, query_version, vector_version)
        if check is None:
            return False
        if check.verified and not answer.used_vector:
            check.verified = False
            check.note += "; but it encoded the text itself this time: merged by rank fusion"
        outcome.student.CopyFrom(check)
        return check.verified
