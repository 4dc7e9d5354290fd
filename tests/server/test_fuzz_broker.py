"""Property-based fuzzing of every BrokerService RPC on a real broker (loopback).

The broker fans out to a scripted node that answers, one that hangs past short deadlines
and a closed port (a node that is down), so every coverage path is reached. What is
promised and the budget: tests/rpc_fuzzing.py.
"""

from __future__ import annotations

import grpc
import pytest
from broker_fixtures import (
    OPERATOR_TOKEN,
    ScriptedNode,
    broker_config,
    closed_port_address,
    start_scripted_node,
)
from hypothesis import given
from hypothesis import strategies as st
from rpc_fuzzing import BUDGETS, ID_LISTS, INT32, INT64, RAW, STRINGS, check_answer, fuzz_settings

from protos import broker_pb2, broker_pb2_grpc, retrieval_pb2
from server.broker.daemon import create_server, stop_server

AUTH = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)
METHODS = tuple(m.name for m in broker_pb2.DESCRIPTOR.services_by_name["BrokerService"].methods)
NODE_IDS = ["a", "slow", "down"]


@pytest.fixture(scope="module")
def broker():
    nodes = [
        start_scripted_node(ScriptedNode("a", [(1, 0.9), (2, 0.5)])),
        start_scripted_node(ScriptedNode("slow", [(3, 0.7)], delay_s=0.05)),
    ]
    addresses = {"a": nodes[0].address, "slow": nodes[1].address, "down": closed_port_address()}
    server, port, broker = create_server(
        broker_config(addresses, default_deadline_ms=300), encoder=None, health_checks=False
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield broker_pb2_grpc.BrokerServiceStub(channel), channel
    channel.close()
    stop_server(server, broker, grace=None)
    for node in nodes:
        node.servicer.release.set()
        node.server.stop(None)


def _still_serving(stub) -> None:
    assert len(stub.Status(broker_pb2.BrokerStatusRequest(), metadata=AUTH, timeout=30).nodes) == 3


FILTERS = st.builds(
    lambda cams, since, until: retrieval_pb2.Filters(
        camera_ids=cams, time_range=retrieval_pb2.TimeRange(since_ms=since, until_ms=until)
    ),
    st.one_of(ID_LISTS, st.lists(st.sampled_from(["cam-a", "cam-slow"]), max_size=2)),
    st.one_of(st.just(0), INT64),
    st.one_of(st.just(0), INT64),
)


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_search(broker, examples):
    stub, _ = broker

    @fuzz_settings(examples)
    @given(
        text=st.one_of(st.just("red jacket"), STRINGS),
        k=st.one_of(st.integers(-3, 120), INT32),
        deadline_ms=st.one_of(st.just(0), st.integers(-5, 400), INT32),
        node_ids=st.one_of(st.lists(st.sampled_from(NODE_IDS), max_size=3), ID_LISTS),
        filters=st.one_of(st.none(), FILTERS),
        full=st.booleans(),
        query_id=st.one_of(st.none(), st.text(alphabet="abc-._ ~!", max_size=70)),
    )
    def run(text, k, deadline_ms, node_ids, filters, full, query_id):
        request = broker_pb2.BrokerSearchRequest(
            text=text, k=k, deadline_ms=min(deadline_ms, 400), node_ids=node_ids,
            require_full_coverage=full,
        )  # fmt: skip
        if filters is not None:
            request.filters.CopyFrom(filters)
        metadata = [*AUTH, ("x-query-id", query_id)] if query_id else AUTH
        response = check_answer(stub.Search, request, metadata=metadata)
        if response is not None:
            assert len(response.hits) <= k and response.coverage.nodes_total >= 1
            assert all(len(n.message) < 2048 for n in response.coverage.nodes)
        _still_serving(stub)

    run()


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_get_thumbnail_and_status(broker, examples):
    stub, _ = broker

    @fuzz_settings(examples)
    @given(
        node_id=st.one_of(st.sampled_from(NODE_IDS), STRINGS),
        image_id=st.one_of(st.integers(-2, 4), INT64),
        max_side=INT32,
    )
    def run(node_id, image_id, max_side):
        request = broker_pb2.BrokerThumbnailRequest(
            node_id=node_id, image_id=image_id, max_side=max_side
        )
        check_answer(stub.GetThumbnail, request, metadata=AUTH)
        assert check_answer(stub.Status, broker_pb2.BrokerStatusRequest(), metadata=AUTH)

    run()


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_raw_bytes_on_every_method(broker, examples):
    stub, channel = broker
    calls = {m: channel.unary_unary(f"/fedretrieve.v1.BrokerService/{m}") for m in METHODS}

    @fuzz_settings(examples)
    @given(method=st.sampled_from(METHODS), data=RAW)
    def run(method, data):
        check_answer(calls[method], data, metadata=AUTH)
        _still_serving(stub)

    run()
