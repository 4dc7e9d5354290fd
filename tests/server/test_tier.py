"""Two tiers of real brokers on loopback: exact merge, coverage rolled up, thumbnails."""

from __future__ import annotations

import pytest
from broker_fixtures import OPERATOR_TOKEN, ScriptedNode, broker_config, closed_port_address

from protos import broker_pb2
from server.broker.config import NodeEntry
from server.broker.tier import start_tier

pytestmark = pytest.mark.timeout(60)


def _sites(scripted_nodes, n: int) -> list[NodeEntry]:
    servicers = [
        ScriptedNode(f"n{i}", [(i * 10 + j + 1, 0.9 - 0.07 * j - 0.011 * i) for j in range(6)])
        for i in range(n)
    ]
    running = scripted_nodes(*servicers)
    return [
        NodeEntry(id=r.servicer.node_id, address=r.address, token=f"token-{r.servicer.node_id}")
        for r in running
    ]


def _config(entries, **overrides):
    base = broker_config({"x": "127.0.0.1:1"}, **overrides)
    return base.__class__(**{**base.__dict__, "nodes": tuple(entries)})


@pytest.fixture
def tier():
    closers = []

    def start(entries, regions):
        top, close = start_tier(entries, regions, _config, encoder=None)
        closers.extend(close)
        return top

    yield start
    for close in closers:
        close()


def test_two_tiers_merge_exactly_like_one_broker(scripted_nodes, start_broker, tier):
    sites = _sites(scripted_nodes, 6)
    flat = start_broker(_config(sites))
    top = start_broker(tier(sites, regions=2))
    req = broker_pb2.BrokerSearchRequest(text="a woman in a red jacket", k=8)
    one = flat.stub.Search(req, metadata=flat.auth(), timeout=10)
    two = top.stub.Search(req, metadata=top.auth(), timeout=10)
    assert len(one.hits) == 8
    assert two.hits[0].node_id.startswith("region-00/")
    strip = [(h.node_id.split("/")[-1], h.image_id, round(h.score, 5)) for h in two.hits]
    assert strip == [(h.node_id, h.image_id, round(h.score, 5)) for h in one.hits]
    cov = two.coverage
    assert (cov.nodes_total, cov.nodes_answered, cov.full) == (6, 6, True)
    assert sorted(o.node_id for o in cov.nodes) == sorted(
        f"region-0{i // 3}/n{i}" for i in range(6)
    )


def test_a_failed_site_is_named_through_its_region(scripted_nodes, start_broker, tier):
    sites = _sites(scripted_nodes, 3)
    dead = NodeEntry(id="dead", address=closed_port_address(), token="token-dead")
    top = start_broker(tier([*sites, dead], regions=2))  # region-01 = n2 + dead
    req = broker_pb2.BrokerSearchRequest(text="a woman in a red jacket", k=4)
    response = top.stub.Search(req, metadata=top.auth(), timeout=10)
    cov = response.coverage
    failed = [o for o in cov.nodes if o.state != "ok"]
    assert [o.node_id for o in failed] == ["region-01/dead"]
    assert failed[0].grpc_status == "UNAVAILABLE"
    assert (cov.nodes_total, cov.nodes_answered, cov.full) == (4, 3, False)
    assert "node_failure" in cov.degraded


def test_thumbnails_are_fetched_through_the_region(scripted_nodes, start_broker, tier):
    sites = _sites(scripted_nodes, 4)
    top = start_broker(tier(sites, regions=2))
    hit = top.stub.Search(
        broker_pb2.BrokerSearchRequest(text="a man", k=1), metadata=top.auth(), timeout=10
    ).hits[0]
    thumb = top.stub.GetThumbnail(
        broker_pb2.BrokerThumbnailRequest(node_id=hit.node_id, image_id=hit.image_id),
        metadata=[("authorization", f"Bearer {OPERATOR_TOKEN}")],
        timeout=10,
    )
    assert thumb.jpeg[:2] == b"\xff\xd8" and thumb.camera_id == f"cam-{hit.node_id.split('/')[1]}"
