"""Issue 17 on a real broker: bounded ids and short messages, undecodable bytes, refused
operators counted, and one query-id rule shared with the nodes."""

from __future__ import annotations

import logging

import grpc
import pytest
from broker_fixtures import ScriptedNode, broker_config

from common.errors import ConfigError, name_some, short_repr
from common.rpc.errors import MAX_DETAILS_CHARS, bounded_details
from common.rpc.query_id import check_query_id, is_valid_query_id, query_id_for_log
from protos import broker_pb2, retrieval_pb2

MAX_DETAILS = 512


def _refused(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30, **kwargs)
    return err.value


@pytest.fixture
def handle(scripted_nodes, start_broker):
    (a,) = scripted_nodes(ScriptedNode("a", [(1, 0.5)]))
    return start_broker(broker_config({"a": a.address}))


@pytest.mark.parametrize(
    ("request_fields", "needle"),
    [
        ({"node_ids": [f"node-{i}" for i in range(5_000)]}, "max-node-ids"),
        ({"node_ids": [f"node-{i}" for i in range(200)]}, "(+195 more)"),
        ({"node_ids": ["n" * 1_000_000]}, "max-id-chars"),
        ({"filters": retrieval_pb2.Filters(camera_ids=["c"] * 5_000)}, "max-camera-ids"),
        ({"filters": retrieval_pb2.Filters(camera_ids=["c" * 100_000])}, "max-id-chars"),
    ],
)
def test_huge_id_lists_are_short_invalid_arguments(handle, request_fields, needle):
    request = broker_pb2.BrokerSearchRequest(text="red jacket", k=5, **request_fields)
    err = _refused(handle.stub.Search, request, metadata=handle.auth())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details()[:200])
    assert needle in err.details() and len(err.details()) < MAX_DETAILS


def test_unknown_thumbnail_node_id_message_is_short(handle):
    request = broker_pb2.BrokerThumbnailRequest(node_id="z\n" * 500_000, image_id=1)
    err = _refused(handle.stub.GetThumbnail, request, metadata=handle.auth())
    assert err.code() == grpc.StatusCode.NOT_FOUND and len(err.details()) < MAX_DETAILS
    assert "\n" not in err.details()


def test_limit_keys_are_validated(scripted_nodes):
    for key in ("max_node_ids", "max_camera_ids", "max_id_chars"):
        with pytest.raises(ConfigError, match=key.replace("_", "-")):
            broker_config({"a": "127.0.0.1:1"}, **{key: 0})


@pytest.mark.parametrize("method", ["Search", "GetThumbnail", "Status"])
@pytest.mark.parametrize("open_broker", [False, True])
def test_undecodable_bytes_are_invalid_argument(
    scripted_nodes, start_broker, caplog, method, open_broker
):
    (a,) = scripted_nodes(ScriptedNode("a", [(1, 0.5)]))
    overrides = {"operator_tokens": (), "allow_unauthenticated": True} if open_broker else {}
    handle = start_broker(broker_config({"a": a.address}, **overrides))
    caplog.set_level(logging.DEBUG)
    call = handle.channel.unary_unary(f"/fedretrieve.v1.BrokerService/{method}")
    err = _refused(call, b"\xff\xff\xff\xff", metadata=handle.auth())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < MAX_DETAILS
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert handle.stub.Status(broker_pb2.BrokerStatusRequest(), metadata=handle.auth()).nodes


def test_refused_operators_are_counted(handle):
    registry = handle.broker.metrics.registry
    for metadata, reason in (((), "missing"), ((("authorization", "Bearer nope"),), "wrong")):
        err = _refused(handle.stub.Status, broker_pb2.BrokerStatusRequest(), metadata=metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        sample = registry.get_sample_value(
            "fedretrieve_broker_auth_refused_total", {"reason": reason}
        )
        assert sample == 1.0, reason


def test_one_query_id_rule_for_broker_and_nodes(handle, scripted_nodes):
    assert is_valid_query_id("op-42.a_b") and is_valid_query_id("x" * 64)
    for bad in ("", "x" * 65, "a b", "q1\n", "q1\nINFO forged", "ü", "a\x1b[2J"):
        assert not is_valid_query_id(bad), bad
        assert query_id_for_log(bad) in ("-", "invalid")
    assert check_query_id("") == "" and check_query_id("q-1") == "q-1"
    with pytest.raises(Exception, match="query_id") as err:
        check_query_id("q1\n" + "x" * 10_000)
    assert len(str(err.value)) < 200 and "\n" not in str(err.value)
    # the broker keeps a valid operator id and replaces an invalid one
    request = broker_pb2.BrokerSearchRequest(text="red jacket", k=1)
    kept = handle.stub.Search(request, metadata=handle.auth("op-42.a_b"), timeout=30)
    assert kept.query_id == "op-42.a_b"
    replaced = handle.stub.Search(request, metadata=handle.auth("a" * 65), timeout=30)
    assert is_valid_query_id(replaced.query_id) and replaced.query_id != "a" * 65


def test_message_helpers_stay_short_whatever_they_quote():
    assert name_some(["a"]) == "['a']"
    assert name_some([f"id{i}" for i in range(5_000)]) == (
        "['id0', 'id1', 'id2', 'id3', 'id4'] (+4,995 more)"
    )
    assert name_some(["cam9", "a\nb"], plain=True) == "cam9, 'a\\nb'"
    assert len(short_repr("x" * 10_000_000)) < 80
    assert len(name_some(["y" * 1_000_000] * 10)) < 400
    long = bounded_details("line one\nline two " + "z" * 100_000)
    assert len(long) <= MAX_DETAILS_CHARS < MAX_DETAILS and "\n" not in long
