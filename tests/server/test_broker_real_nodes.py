"""The broker against real node daemons with real galleries (tiny model everywhere).

Acceptance: the merged top-k equals the top-k of ONE faiss index over the union of all
galleries, computed offline with the same model on the same images.
"""

from __future__ import annotations

import contextlib
import io
import time

import faiss
import grpc
import numpy as np
import pytest
from broker_fixtures import OPERATOR_TOKEN, broker_config, crop
from PIL import Image

from protos import broker_pb2, node_pb2, node_pb2_grpc, retrieval_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NODE_TOKEN = "node-token"
AUTH = [("authorization", f"Bearer {OPERATOR_TOKEN}")]
QUERIES = [
    "a woman in a red jacket and black trousers",
    "a man with a blue shirt",
    "person in green carrying a yellow bag",
]


@pytest.fixture
def real_nodes(tmp_path):
    """Three real node daemons, 8 + 6 + 7 images, tiny model, token auth."""
    with _serve_nodes(tmp_path, (("north", 8), ("south", 6), ("east", 7))) as galleries:
        yield galleries


@contextlib.contextmanager
def _serve_nodes(tmp_path, sizes, **node_options):
    from edge_node.config import AuthSettings, IndexSettings, NodeConfig
    from edge_node.serving.daemon import create_server, shutdown

    started, galleries = [], {}
    seed = 0
    for node_id, n in sizes:
        config = NodeConfig(
            **node_options,
            node_id=node_id,
            data_dir=tmp_path / node_id,
            listen="127.0.0.1:0",
            model="tiny",
            adapter_dir=tmp_path / f"{node_id}-adapters",
            index=IndexSettings(embed_batch_size=8, save_interval_s=0.0),
            auth=AuthSettings(token=NODE_TOKEN),
            grace_s=1.0,
        )
        server, port, node = create_server(config)
        server.start()
        started.append((server, node))
        items = [
            node_pb2.ImageItem(
                data=crop(seed + i),
                camera_id=f"{node_id}-cam{i % 2}",
                timestamp_ms=1_700_000_000_000 + 1000 * (seed + i),
                file_name=f"{node_id}_{i}.png",
            )
            for i in range(n)
        ]
        seed += n
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = node_pb2_grpc.NodeServiceStub(channel).Ingest(
                node_pb2.IngestRequest(images=items),
                metadata=[("authorization", f"Bearer {NODE_TOKEN}")],
                timeout=60,
            )
        assert all(r.accepted for r in reply.results), [r.reason for r in reply.results]
        assert node.wait_indexed(60)
        galleries[node_id] = (
            f"127.0.0.1:{port}",
            [(r.image_id, item) for r, item in zip(reply.results, items, strict=True)],
        )
    yield galleries
    for server, node in started:
        shutdown(server, node, 1.0)


def union_topk(model, galleries, text: str, k: int):
    """Offline: one faiss index over every node's images, embedded with the same model."""
    from common.preprocess import load_image

    keys, images = [], []
    for node_id, (_addr, items) in galleries.items():
        for image_id, item in items:
            keys.append((node_id, image_id))
            images.append(load_image(item.data))
    vectors = model.encode_images(images).numpy().astype("float32")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    query = model.encode_text([text]).numpy().astype("float32")
    scores, rows = index.search(query, k)
    return [(keys[r], float(s)) for s, r in zip(scores[0], rows[0], strict=True)]


@pytest.mark.parametrize("broker_embeds", [True, False])
def test_merged_topk_equals_single_union_index(real_nodes, tiny_model, start_broker, broker_embeds):
    config = broker_config({node_id: addr for node_id, (addr, _) in real_nodes.items()}, NODE_TOKEN)
    handle = start_broker(config, encoder=tiny_model if broker_embeds else None)
    k = 10
    for text in QUERIES:
        response = handle.stub.Search(
            broker_pb2.BrokerSearchRequest(text=text, k=k, deadline_ms=10_000),
            metadata=AUTH,
            timeout=30,
        )
        expected = union_topk(tiny_model, real_nodes, text, k)
        got = [((h.node_id, h.image_id), h.score) for h in response.hits]
        assert [key for key, _ in got] == [key for key, _ in expected], text
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
        assert response.merge == "score" and response.coverage.full
        assert response.coverage.vectors_total == 21 and response.coverage.vectors_searched == 21
        assert all(o.used_vector == broker_embeds for o in response.coverage.nodes)
        assert {h.model_version for h in response.hits} == {tiny_model.version}
        assert len({h.node_id for h in response.hits}) >= 2  # a real merge, not one node's list


def test_filters_and_thumbnails_through_real_nodes(real_nodes, tiny_model, start_broker):
    handle = start_broker(
        broker_config({node_id: addr for node_id, (addr, _) in real_nodes.items()}, NODE_TOKEN),
        encoder=tiny_model,
    )
    handle.broker.registry.check_all()  # learns each node's cameras (and health)
    filters = retrieval_pb2.Filters(camera_ids=["north-cam0", "east-cam1"])
    response = handle.stub.Search(
        broker_pb2.BrokerSearchRequest(text=QUERIES[0], k=50, filters=filters),
        metadata=AUTH,
        timeout=30,
    )
    assert {h.camera_id for h in response.hits} == {"north-cam0", "east-cam1"}
    assert len(response.hits) == 4 + 3
    states = {o.node_id: o.state for o in response.coverage.nodes}
    assert states == {"north": "ok", "south": "skipped", "east": "ok"}
    assert response.coverage.full and response.coverage.nodes_skipped == 1
    assert response.coverage.vectors_searched == 4 + 3
    hit = response.hits[0]
    thumb = handle.stub.GetThumbnail(
        broker_pb2.BrokerThumbnailRequest(node_id=hit.node_id, image_id=hit.image_id, max_side=32),
        metadata=AUTH,
        timeout=30,
    )
    img = Image.open(io.BytesIO(thumb.jpeg))
    assert max(img.size) <= 32 and thumb.camera_id == hit.camera_id
    status = handle.stub.Status(broker_pb2.BrokerStatusRequest(), metadata=AUTH, timeout=10)
    assert all(n.healthy and n.model_version == tiny_model.version for n in status.nodes)
    assert sorted(n.gallery_size for n in status.nodes) == [6, 7, 8]
    assert sorted(n.indexed_size for n in status.nodes) == [6, 7, 8]  # all embedded
    assert all(not n.reindex_running and n.adapter_version == "" for n in status.nodes)
    assert all(n.camera_norm_version == "" for n in status.nodes)  # the option is off
    assert {n.node_id: list(n.camera_ids) for n in status.nodes}["south"] == [
        "south-cam0",
        "south-cam1",
    ]


def test_find_similar_ranks_like_one_union_index_of_images(real_nodes, tiny_model, start_broker):
    """SearchSimilar: the owner node embeds its crop; the fleet's merged answer equals an
    offline image-to-image search over the union, the crop itself first."""
    from common.preprocess import load_image

    handle = start_broker(
        broker_config({node_id: addr for node_id, (addr, _) in real_nodes.items()}, NODE_TOKEN),
        encoder=tiny_model,
    )
    image_id, item = real_nodes["south"][1][2]
    response = handle.stub.SearchSimilar(
        broker_pb2.SearchSimilarRequest(node_id="south", image_id=image_id, k=8),
        metadata=AUTH,
        timeout=30,
    )
    keys, images = [], []
    for node_id, (_addr, items) in real_nodes.items():
        for iid, it in items:
            keys.append((node_id, iid))
            images.append(load_image(it.data))
    vectors = tiny_model.encode_images(images).numpy().astype("float32")
    query = tiny_model.encode_images([load_image(item.data)]).numpy().astype("float32")
    order = np.argsort(-(vectors @ query[0]))[:8]
    assert [(h.node_id, h.image_id) for h in response.hits] == [keys[i] for i in order]
    assert (response.hits[0].node_id, response.hits[0].image_id) == ("south", image_id)
    assert response.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert response.coverage.full and response.coverage.nodes_answered == 3
    assert all(o.used_vector for o in response.coverage.nodes)


def test_find_similar_names_an_unknown_image_or_node(real_nodes, tiny_model, start_broker):
    handle = start_broker(
        broker_config({node_id: addr for node_id, (addr, _) in real_nodes.items()}, NODE_TOKEN),
        encoder=tiny_model,
    )
    for request, words in (
        (broker_pb2.SearchSimilarRequest(node_id="south", image_id=999, k=5), "node south"),
        (broker_pb2.SearchSimilarRequest(node_id="nowhere", image_id=1, k=5), "unknown node"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            handle.stub.SearchSimilar(request, metadata=AUTH, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and words in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        handle.stub.SearchSimilar(
            broker_pb2.SearchSimilarRequest(node_id="south", image_id=1, k=0),
            metadata=AUTH,
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "`k`" in err.value.details()


def test_the_broker_reports_each_nodes_camera_normalisation(tmp_path, tiny_model, start_broker):
    """What a node serves includes its colour gains: the fleet view must name them."""
    from edge_node.config import CameraNormSettings

    norm = CameraNormSettings(enabled=True, min_images=1)  # gains from the first crop on
    with _serve_nodes(tmp_path, (("west", 4),), camera_norm=norm, adapter_poll_s=0.1) as nodes:
        config = broker_config({"west": nodes["west"][0]}, NODE_TOKEN)
        handle = start_broker(config, encoder=tiny_model)
        deadline = time.monotonic() + 30  # the node re-fits on its watcher's timer
        while True:
            handle.broker.registry.check_all()
            request = broker_pb2.BrokerStatusRequest()
            (node,) = handle.stub.Status(request, metadata=AUTH, timeout=10).nodes
            if node.camera_norm_version != "none" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert node.camera_norm_version.startswith("cn-")
    assert node.gallery_size == node.indexed_size == 4


def test_a_vector_only_node_in_the_fleet(tmp_path, tiny_model, start_broker):
    """A broker that embeds sends the vector-only node a vector it answers like any node; a
    broker that does not embed gets its FAILED_PRECONDITION in coverage, named and explained."""
    with (
        _serve_nodes(tmp_path / "full", (("north", 5),)) as full,
        _serve_nodes(tmp_path / "lean", (("east", 4),), text_tower=False) as lean,
    ):
        addresses = {node_id: addr for node_id, (addr, _) in {**full, **lean}.items()}
        for encoder in (tiny_model, None):
            handle = start_broker(broker_config(addresses, NODE_TOKEN), encoder=encoder)
            handle.broker.registry.check_all()  # learns which node is vector-only
            request = broker_pb2.BrokerSearchRequest(text=QUERIES[0], k=9, deadline_ms=10_000)
            response = handle.stub.Search(request, metadata=AUTH, timeout=30)
            cov = {o.node_id: o for o in response.coverage.nodes}
            if encoder is not None:
                assert response.coverage.full and len(response.hits) == 9
                assert cov["east"].state == "ok" and cov["east"].used_vector
                continue
            assert not response.coverage.full and cov["north"].state == "ok"
            assert {h.node_id for h in response.hits} == {"north"}
            east = cov["east"]
            assert (east.state, east.grpc_status) == ("failed", "FAILED_PRECONDITION")
            assert east.message.startswith(
                "node east serves vector queries only (text-tower = false): send a query "
                f"vector of model version {tiny_model.version!r}"
            )
            assert east.message.endswith(
                "; this broker embeds no queries (no `model` in its config), so the node got "
                "text only"
            )
            assert "node_failure" in response.coverage.degraded
            status = handle.stub.Status(broker_pb2.BrokerStatusRequest(), metadata=AUTH, timeout=10)
            assert {n.node_id: n.vector_only for n in status.nodes} == {
                "north": False,
                "east": True,
            }
