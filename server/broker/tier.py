"""Tiers of brokers: a regional broker that speaks NodeService upward.

A city or a retail chain does not fan one query out to a thousand sites from one process:
regional brokers each cover their sites, and a top broker covers the regions (the tree of
aggregators of Dean and Barroso's "The Tail at Scale", Vespa's and Elasticsearch's
coordinating nodes). Here a region is an ordinary `Broker` over its sites, served through
`RegionServicer`, which answers `NodeService` so that the top broker registers it like any
node: no second protocol and no code in the top broker that knows it talks to a region.

Exactness: every site scores with the same model version, a region returns its exact
top-k (its own merge), and the top broker merges the regions' lists by score; the top-k
of the union of top-k lists is the global top-k. Hits keep the site they came from
(`hit.node_id`), which the top broker turns into `region/site`.

Coverage rolls up: a region's answer carries one `NodeOutcome` per site
(`SearchResponse.lower_tier`), and the top broker reports those as `region/site` entries,
so an operator reads which site under which region failed. A region that fails as a
whole is one entry, under its own name.

Thumbnails go through the region too: `ThumbnailRequest.node_id` names the site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc

from common.errors import InvalidQuery
from common.rpc.errors import translate_errors
from common.rpc.server import add_health_and_reflection, bind
from protos import broker_pb2, node_pb2, node_pb2_grpc
from server.broker.broker import Broker, TextEncoder
from server.broker.config import BrokerConfig, NodeEntry
from server.broker.registry import NodeRegistry

log = logging.getLogger(__name__)

NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
rpc = translate_errors("region broker")


class RegionServicer(node_pb2_grpc.NodeServiceServicer):
    """A broker's sites, answered as if they were one node (see the module docstring)."""

    def __init__(self, region_id: str, broker: Broker) -> None:
        self.region_id = region_id
        self.broker = broker

    @rpc
    def Search(self, request, context):
        remaining = context.time_remaining()
        caller_remaining = None if remaining is None or remaining > 1e8 else remaining
        answer = self.broker.search(
            broker_pb2.BrokerSearchRequest(text=request.text, k=request.k, filters=request.filters),
            query_id=request.query_id or None,
            caller_remaining_s=caller_remaining,
            vector=request.vector if request.vector.values else None,
        )
        cov = answer.coverage
        response = node_pb2.SearchResponse(
            model_version=answer.model_version or _version_of(answer),
            gallery_size=cov.vectors_total,
            vectors_searched=cov.vectors_searched,
            used_vector=bool(request.vector.values)
            and request.vector.model_version == answer.model_version,
            took_ms=answer.took_ms,
        )
        if answer.merge == "rrf":  # fused scores are not cosines: say so upward
            versions = sorted({h.model_version for h in answer.hits})
            response.model_version = "mixed:" + ",".join(versions)
        response.hits.extend(answer.hits)  # node_id stays the site's
        response.lower_tier.extend(cov.nodes)
        return response

    @rpc
    def GetThumbnail(self, request, context):
        if not request.node_id:
            raise InvalidQuery(
                f"region {self.region_id}: GetThumbnail needs `node_id` (the site under it)"
            )
        return self.broker.thumbnail(
            broker_pb2.BrokerThumbnailRequest(
                node_id=request.node_id, image_id=request.image_id, max_side=request.max_side
            )
        )

    @rpc
    def Status(self, request, context):
        status = node_pb2.StatusResponse(
            node_id=self.region_id, model_version=self.broker.model_version, backend="region"
        )
        cameras: set[str] = set()
        for node_id in self.broker.registry.ids:
            known = self.broker.registry.snapshot(node_id)
            status.gallery_size += known.gallery_size
            cameras.update(known.cameras or ())
        status.indexed_size = status.gallery_size
        status.camera_ids.extend(sorted(cameras))
        return status

    @rpc
    def Ingest(self, request, context):
        raise InvalidQuery(f"region {self.region_id} holds no gallery: ingest at a site")


def _version_of(answer: broker_pb2.BrokerSearchResponse) -> str:
    versions = {h.model_version for h in answer.hits if h.model_version}
    return versions.pop() if len(versions) == 1 else ""


def create_region_server(
    region_id: str,
    config: BrokerConfig,
    *,
    encoder: TextEncoder | None,
    listen: str = "127.0.0.1:0",
    health_checks: bool = True,
) -> tuple[grpc.Server, int, Broker]:
    """A regional broker over `config.nodes`, serving NodeService on `listen` (loopback by
    default; an open address belongs behind the same auth as a node: see docs/broker.md)."""
    registry = NodeRegistry(config)
    broker = Broker(config, registry, encoder=encoder)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers))
    node_pb2_grpc.add_NodeServiceServicer_to_server(RegionServicer(region_id, broker), server)
    add_health_and_reflection(server, [NODE_SERVICE])
    try:
        port = bind(server, listen)
    except BaseException:
        broker.close()
        raise
    if health_checks:
        registry.start()
    server.start()
    return server, port, broker


def start_tier(
    sites: Sequence[NodeEntry],
    regions: int,
    make_config: Callable[[Sequence[NodeEntry]], BrokerConfig],
    encoder: TextEncoder | None,
) -> tuple[BrokerConfig, list[Callable[[], None]]]:
    """Split `sites` into `regions` contiguous groups, start a regional broker for each on
    loopback, and return the top broker's config (one node per region) and the closers.
    For simulations and benchmarks; a deployment runs each region as its own daemon."""
    regions = max(1, min(regions, len(sites)))
    size = -(-len(sites) // regions)
    entries, closers = [], []
    try:
        for r in range(regions):
            group = sites[r * size : (r + 1) * size]
            if not group:
                continue
            region_id = f"region-{r:02d}"
            server, port, broker = create_region_server(
                region_id, make_config(group), encoder=encoder, health_checks=False
            )
            closers.append(lambda s=server, b=broker: (s.stop(None), b.close()))
            entries.append(NodeEntry(id=region_id, address=f"127.0.0.1:{port}"))
        return make_config(entries), closers
    except BaseException:
        for close in closers:
            close()
        raise
