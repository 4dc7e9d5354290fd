"""Vector-only nodes (`text-tower = false`, issue 15): vector queries answered exactly as a
full node answers them, text refused with FAILED_PRECONDITION naming the mode, Status says
so, the export backend opens no text graph, and a node serving an export imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
from node_fixtures import AUTH, gallery_items, ingest
from PIL import Image

from common.errors import TextTowerAbsent
from common.factory import create_model
from edge_node.accel.backend import load_backend
from edge_node.accel.export import export_model
from edge_node.accel.ort import OrtBackend
from protos import node_pb2, retrieval_pb2

QUERY = "a person in a red top and black trousers"
ROOT = Path(__file__).resolve().parents[2]


def _search(served, **fields) -> node_pb2.SearchResponse:
    return served.stub.Search(node_pb2.SearchRequest(**fields), metadata=AUTH, timeout=30)


def _refusal(served, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _search(served, **fields)
    return err.value


def test_vector_only_node_answers_vectors_like_a_full_node_and_refuses_text(serve_node, tmp_path):
    full = serve_node()
    lean = serve_node(node_id="node-v", data_dir=tmp_path / "lean", text_tower=False)
    items = gallery_items(16)
    assert ingest(full, items) == ingest(lean, items)
    assert lean.node.active.backend.model.text_tower is None  # freed, not merely unused

    model = create_model("tiny")
    vector = model.encode_text([QUERY]).numpy()[0]
    qv = retrieval_pb2.QueryVector(values=vector.tolist(), model_version=model.version)
    want, got = _search(full, vector=qv, k=8), _search(lean, vector=qv, k=8)
    assert got.used_vector and got.model_version == want.model_version == model.version
    assert [(h.image_id, h.score) for h in got.hits] == [(h.image_id, h.score) for h in want.hits]

    err = _refusal(lean, text=QUERY, k=5)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == (
        "node node-v serves vector queries only (text-tower = false): send a query vector "
        f"of model version {model.version!r}"
    )
    other = retrieval_pb2.QueryVector(values=vector.tolist(), model_version="other@123")
    err = _refusal(lean, text=QUERY, vector=other, k=5)  # a full node would encode the text
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vector queries only" in err.details() and "'other@123'" in err.details()
    assert _refusal(lean, k=5).code() == grpc.StatusCode.INVALID_ARGUMENT  # empty stays so

    status = [
        s.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=10) for s in (full, lean)
    ]
    assert [s.vector_only for s in status] == [False, True]
    embedded = lean.stub.EmbedImage(  # find similar: the image tower still serves
        node_pb2.EmbedImageRequest(image_id=got.hits[0].image_id), metadata=AUTH, timeout=30
    )
    assert embedded.vector.model_version == model.version


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[Path, object]:
    model = create_model("tiny").eval()
    out = tmp_path_factory.mktemp("vector-only") / "onnx"
    export_model(model, out, model_spec="tiny")
    return out, model


def test_ort_backend_without_text_tower_opens_no_text_graph(tiny_export, monkeypatch):
    out, model = tiny_export
    opened = []
    real = onnxruntime.InferenceSession

    def session(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    lean = load_backend("onnxruntime", str(out), None, "cpu", text_tower=False)  # probed
    assert len(opened) == 1 and "text" not in opened[0]
    assert lean.tokenizer is None and not lean.text_tower
    with pytest.raises(TextTowerAbsent, match="without its text tower"):
        lean.encode_text([QUERY])
    full = OrtBackend(out, model_version=model.version)
    assert len(opened) == 3  # the full backend opens both graphs
    crops = [Image.new("RGB", (20 + i, 40), (40 * i, 90, 200 - 30 * i)) for i in range(4)]
    np.testing.assert_array_equal(lean.encode_images(crops), full.encode_images(crops))


CHILD = """
import io, json, sys
import numpy as np
from PIL import Image
from edge_node.config import IndexSettings, NodeConfig
from edge_node.serving.daemon import create_server, shutdown
from edge_node.serving.domain import SearchQuery
from edge_node.serving.gallery import IngestItem

export, data, vector_file, version = sys.argv[1:5]
config = NodeConfig(
    node_id="lean", data_dir=data, listen="127.0.0.1:0", model=export,
    backend="onnxruntime", text_tower=False, index=IndexSettings(embed_batch_size=4),
)
server, port, node = create_server(config)
server.start()
items = []
for i in range(6):
    buf = io.BytesIO()
    Image.new("RGB", (20, 40), (30 * i, 90, 200 - 30 * i)).save(buf, format="PNG")
    items.append(IngestItem(data=buf.getvalue(), camera_id="cam0", timestamp_ms=i + 1))
node.ingest(items)
assert node.wait_indexed(60)
result = node.search(SearchQuery(vector=np.load(vector_file), vector_version=version, k=3))
shutdown(server, node, 1.0)
imported = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print(json.dumps({"hits": len(result.hits), "used_vector": result.used_vector,
                  "imported": imported}))
"""


def test_a_vector_only_node_serving_an_export_imports_no_torch(tiny_export, tmp_path):
    out, model = tiny_export
    np.save(tmp_path / "q.npy", model.encode_text([QUERY]).numpy()[0])
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(out), str(tmp_path / "data"),
         str(tmp_path / "q.npy"), model.version],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"hits": 3, "used_vector": True, "imported": []}
