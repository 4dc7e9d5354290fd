"""A node serving a distilled student (issue 15, mixed fleets): it takes its teacher's query
vectors, says so in Status (`query_version`), embeds a probe crop it is sent without storing
it (the broker's calibration check), and an export of a student carries its query version."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from node_fixtures import AUTH, gallery_items, ingest, person_crop
from PIL import Image

from common.distill import make_student, save_student
from common.factory import create_model
from common.preprocess import load_image
from edge_node.accel.manifest import MANIFEST_FILE, read_manifest
from edge_node.config import Limits
from protos import node_pb2, retrieval_pb2

QUERY = "a person in a red top and black trousers"
SMALL_CNN = {"type": "cnn", "widths": [8, 8], "depths": [1, 1], "groups": 4}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """(teacher, student model, student dir): a random-init narrower image tower of `tiny`."""
    teacher = create_model("tiny").eval()
    out = save_student(make_student(teacher, SMALL_CNN), tmp_path_factory.mktemp("s") / "student")
    return teacher, create_model(out).eval(), out


def _status(served) -> node_pb2.StatusResponse:
    return served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10)


def _refusal(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, metadata=AUTH, timeout=30)
    return err.value


def test_a_student_node_searches_with_its_teachers_vector_and_refuses_others(
    student, serve_node, tmp_path
):
    teacher, model, model_dir = student
    served = serve_node(model=str(model_dir))
    items = gallery_items(10)
    ids = ingest(served, items)
    assert model.version != teacher.version and model.query_version == teacher.version
    status = _status(served)
    assert (status.model_version, status.query_version) == (model.version, teacher.version)

    vector = teacher.encode_text([QUERY]).numpy()[0]
    qv = retrieval_pb2.QueryVector(values=vector.tolist(), model_version=teacher.version)
    got = served.stub.Search(node_pb2.SearchRequest(vector=qv, k=5), metadata=AUTH, timeout=30)
    assert got.used_vector and got.model_version == model.version
    assert got.query_version == teacher.version
    gallery = model.encode_images([load_image(item.data) for item in items]).numpy()
    scores = gallery @ (vector / np.linalg.norm(vector))
    order = np.argsort(-scores)[:5]
    assert [h.image_id for h in got.hits] == [ids[i] for i in order]
    np.testing.assert_allclose([h.score for h in got.hits], scores[order], atol=1e-5)

    other = retrieval_pb2.QueryVector(values=vector.tolist(), model_version="other@123")
    err = _refusal(served.stub.Search, node_pb2.SearchRequest(vector=other, k=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"a student of {teacher.version!r}" in err.details() and "'other@123'" in err.details()
    with_text = node_pb2.SearchRequest(text=QUERY, vector=other, k=5)  # its own text tower
    answer = served.stub.Search(with_text, metadata=AUTH, timeout=30)
    assert not answer.used_vector and len(answer.hits) == 5

    ordinary = serve_node(node_id="node-t", data_dir=tmp_path / "teacher")
    status = _status(ordinary)
    assert status.query_version == status.model_version == teacher.version


def test_embed_image_embeds_the_bytes_sent_without_storing_them(student, serve_node, tmp_path):
    _teacher, model, model_dir = student
    served = serve_node(model=str(model_dir), limits=Limits(max_image_bytes=50_000))
    ingest(served, gallery_items(3))
    crop = person_crop(42, fmt="PNG")
    reply = served.stub.EmbedImage(
        node_pb2.EmbedImageRequest(image=crop), metadata=AUTH, timeout=30
    )
    want = model.encode_images([load_image(crop)]).numpy()[0]
    np.testing.assert_allclose(reply.vector.values, want, atol=1e-5)
    assert reply.vector.model_version == model.version and reply.camera_id == ""
    assert _status(served).gallery_size == 3  # embedded, not stored

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")  # about 120 kB of noise
    cases = [
        (dict(image=b"\x89PNG\r\n\x1a\nnot really"), "`image` refused: "),
        (dict(image=crop[: len(crop) // 2]), "`image` refused: corrupt image"),
        (dict(image=buf.getvalue()), "exceeds max-image-bytes 50000"),
        (dict(image=crop, image_id=1), "give `image_id` or `image`, not both"),
        (dict(), "give `image_id` (a gallery crop) or `image`"),
    ]
    for fields, words in cases:
        err = _refusal(served.stub.EmbedImage, node_pb2.EmbedImageRequest(**fields))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields.keys(), err.details())
        assert words in err.details(), err.details()


def test_an_export_of_a_student_names_its_teachers_query_version(student, tmp_path):
    from edge_node.accel.export import export_model
    from edge_node.accel.ort import OrtBackend

    teacher, model, model_dir = student
    out = tmp_path / "onnx"
    export_model(model, out, model_spec=str(model_dir))
    assert read_manifest(out).query_version == teacher.version
    backend = OrtBackend(out, model_version=model.version, text_tower=False)
    assert (backend.version, backend.query_version) == (model.version, teacher.version)

    path = out / MANIFEST_FILE  # a manifest written before the field: its own version
    data = json.loads(path.read_text())
    del data["query_version"]
    path.write_text(json.dumps(data))
    assert read_manifest(out).query_version == model.version
