"""A real node on loopback serving a pre-built ONNX export through `backend = "onnxruntime"`."""

from __future__ import annotations

import io

import numpy as np
from node_fixtures import AUTH, gallery_items, ingest
from PIL import Image

from common.factory import create_model
from edge_node.accel.export import export_model
from protos import node_pb2

QUERY = "a person in a red top and black trousers"


def test_node_serves_an_onnx_export_with_torch_scores(serve_node, tmp_path):
    model = create_model("tiny")
    export_model(model, tmp_path / "export", model_spec="tiny")
    served = serve_node(model=str(tmp_path / "export"), backend="onnxruntime")
    items = gallery_items(12)
    ids = ingest(served, items)

    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10)
    assert status.backend == "onnxruntime"
    assert "pre-built export" in status.backend_note

    reply = served.stub.Search(node_pb2.SearchRequest(text=QUERY, k=5), metadata=AUTH, timeout=30)
    assert reply.model_version == model.version  # same version as the torch node
    images = [Image.open(io.BytesIO(it.data)).convert("RGB") for it in items]
    scores = model.encode_images(images).numpy() @ model.encode_text([QUERY]).numpy()[0]
    by_id = dict(zip(ids, scores, strict=True))
    np.testing.assert_allclose(
        [h.score for h in reply.hits], [by_id[h.image_id] for h in reply.hits], atol=1e-4
    )
    assert [h.image_id for h in reply.hits] == sorted(ids, key=lambda i: -by_id[i])[:5]
