"""Broker -> node channel options that gRPC accepts for every valid config."""

from __future__ import annotations

import pytest
from broker_fixtures import ScriptedNode, broker_config

from protos import broker_pb2


@pytest.mark.parametrize("attempts", [1, 3])
def test_retry_setting_one_disables_retries_and_still_reaches_nodes(
    attempts, scripted_nodes, start_broker
):
    """`retry-max-attempts = 1` is documented as "disables"; gRPC rejects a retry policy
    of one attempt, which made every node call fail INVALID_ARGUMENT."""
    (a,) = scripted_nodes(ScriptedNode("a", [(1, 0.9)]))
    handle = start_broker(broker_config({"a": a.address}, retry_max_attempts=attempts))
    req = broker_pb2.BrokerSearchRequest(text="a man in a grey jacket", k=1)
    response = handle.stub.Search(req, metadata=handle.auth(), timeout=10)
    assert response.coverage.nodes_answered == 1 and response.hits[0].image_id == 1
