"""Property-based fuzzing of every NodeService RPC on a real node (tiny model, loopback).

What is promised and the budget: tests/rpc_fuzzing.py.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from node_fixtures import AUTH, Served, gallery_items, ingest, make_config, person_crop
from rpc_fuzzing import (
    BUDGETS,
    FLOATS,
    ID_LISTS,
    INT32,
    INT64,
    MAX_DETAILS,
    RAW,
    STRINGS,
    check_answer,
    fuzz_settings,
)

from edge_node.serving.daemon import create_server, shutdown
from protos import node_pb2, node_pb2_grpc, retrieval_pb2

# every method, ones added later included (raw bytes need no strategy of their own)
METHODS = tuple(m.name for m in node_pb2.DESCRIPTOR.services_by_name["NodeService"].methods)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("fuzz-node"))
    server, port, node = create_server(config)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    served = Served(node_pb2_grpc.NodeServiceStub(channel), channel, node, port, config)
    ingest(served, gallery_items(6))
    yield served
    channel.close()
    shutdown(server, node, 1.0)


def _still_serving(served) -> None:
    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=30)
    assert status.node_id == served.config.node_id


def _vectors(version: str):
    return st.one_of(
        st.none(),
        st.builds(
            lambda values, v: retrieval_pb2.QueryVector(values=values, model_version=v),
            st.one_of(
                st.lists(FLOATS, min_size=32, max_size=32),  # the tiny model's dimension
                st.lists(FLOATS, max_size=80),
            ),
            st.one_of(st.just(version), STRINGS),
        ),
    )


def _filters():
    return st.builds(
        lambda cams, since, until: retrieval_pb2.Filters(
            camera_ids=cams, time_range=retrieval_pb2.TimeRange(since_ms=since, until_ms=until)
        ),
        st.one_of(ID_LISTS, st.lists(st.sampled_from(["cam0", "cam1", "cam2"]), max_size=3)),
        st.one_of(st.just(0), INT64),
        st.one_of(st.just(0), INT64),
    )


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_search(node, examples):
    @fuzz_settings(examples)
    @given(
        text=STRINGS,
        vector=_vectors(node.node.active.version),
        k=st.one_of(st.integers(-3, 120), INT32),
        filters=st.one_of(st.none(), _filters()),
        query_id=st.one_of(st.just(""), STRINGS),
    )
    def run(text, vector, k, filters, query_id):
        request = node_pb2.SearchRequest(text=text, k=k, query_id=query_id)
        if vector is not None:
            request.vector.CopyFrom(vector)
        if filters is not None:
            request.filters.CopyFrom(filters)
        response = check_answer(node.stub.Search, request, metadata=AUTH)
        if response is not None:
            assert len(response.hits) <= k
            assert all(h.score == h.score for h in response.hits)  # no NaN scores
        _still_serving(node)

    run()


CROPS = [person_crop(100 + i) for i in range(3)]


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_ingest(node, examples):
    item = st.builds(
        node_pb2.ImageItem,
        data=st.one_of(st.sampled_from(CROPS), RAW),
        camera_id=st.one_of(st.sampled_from(["cam0", "cam-9"]), STRINGS),
        timestamp_ms=INT64,
        captions=st.lists(STRINGS, max_size=20),
        file_name=STRINGS,
    )

    @fuzz_settings(examples)
    @given(images=st.one_of(st.lists(item, max_size=4), st.integers(257, 300)))
    def run(images):
        if isinstance(images, int):  # more images than max-ingest-batch (empty ones)
            images = [node_pb2.ImageItem()] * images
        response = check_answer(
            node.stub.Ingest, node_pb2.IngestRequest(images=images), metadata=AUTH
        )
        if response is not None:
            assert len(response.results) == len(images)
            assert all(len(r.reason) < MAX_DETAILS for r in response.results)
        _still_serving(node)

    run()


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_get_thumbnail_and_status(node, examples):
    @fuzz_settings(examples)
    @given(image_id=st.one_of(st.integers(-2, 10), INT64), max_side=INT32)
    def run(image_id, max_side):
        request = node_pb2.ThumbnailRequest(image_id=image_id, max_side=max_side)
        response = check_answer(node.stub.GetThumbnail, request, metadata=AUTH)
        if response is not None:
            assert response.jpeg and max(response.width, response.height) <= 256
        assert check_answer(node.stub.Status, node_pb2.StatusRequest(), metadata=AUTH)

    run()


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_raw_bytes_on_every_method(node, examples):
    calls = {m: node.channel.unary_unary(f"/fedretrieve.v1.NodeService/{m}") for m in METHODS}

    @fuzz_settings(examples)
    @given(method=st.sampled_from(METHODS), data=RAW)
    def run(method, data):
        check_answer(calls[method], data, metadata=AUTH)
        _still_serving(node)

    run()
