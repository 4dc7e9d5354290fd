"""Issue 14's deployment: two real node daemons ingest uncaptioned crops over Ingest, a
real Flower deployment (SuperLink + two SuperNodes) trains label-free from the daemons'
own galleries, and the same daemons hot-swap the adapter it hands over.

Nothing here has a caption or a person id: each crop comes with a camera id and a
timestamp, as a detector gives them, and a person's visit is three crops half a second
apart, which is what the node's tracklet mining links (edge_node/fl/mining.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.adapters import read_manifest
from protos import node_pb2
from sims.node_process import start_node_processes, wait_until, write_node_config
from tests.edge_node.node_fixtures import person_crop
from tests.integration.flower_deployment import flower_deployment

VISITS, CROPS_PER_VISIT = 12, 3


def _uncaptioned_visits(site: int) -> list[node_pb2.ImageItem]:
    """Per visit: one person (colours from seed % 36), one camera, crops 500 ms apart."""
    items = []
    for v in range(VISITS):
        person = (7 * site + v) % 36
        start = 1_700_000_000_000 + v * 60_000
        for j in range(CROPS_PER_VISIT):  # seed + 36 j: same clothes, other background
            items.append(
                node_pb2.ImageItem(
                    data=person_crop(person + 36 * j),
                    camera_id=f"cam{v % 2}",
                    timestamp_ms=start + 500 * j,
                )
            )
    return items


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_label_free_federation_from_two_daemons_galleries_is_hot_swapped(tmp_path: Path):
    files = [
        write_node_config(tmp_path / f"site{i}", f"site{i}", model="tiny", adapter_poll_s=0.3)
        for i in range(2)
    ]
    daemons = start_node_processes(files)
    out = tmp_path / "out"
    try:
        before = []
        for i, daemon in enumerate(daemons):
            items = _uncaptioned_visits(i)
            n = len(items)
            reply = daemon.stub.Ingest(
                node_pb2.IngestRequest(images=items), metadata=daemon.metadata, timeout=60
            )
            assert all(r.accepted for r in reply.results), [r.reason for r in reply.results]
            wait_until(
                f"{daemon.node_id} to index its crops",
                lambda d=daemon, n=n: d.status().indexed_size == n,
                60,
                [daemon],
            )
            before.append(daemon.status().model_version)

        with flower_deployment(tmp_path) as flower:
            for daemon in daemons:
                site = daemon.config_path.parent
                flower.add_supernode(
                    daemon.node_id,
                    f"gallery='{site / 'data'}' node-id='{daemon.node_id}' "
                    f"adapter-dir='{daemon.adapter_dir}' label-free=true threads=1",
                )
            # no eval-data: a label-free fleet has nothing labelled for the server either
            run = flower.run(
                f"model='tiny' num-server-rounds=1 max-steps=4 batch-size=12 "
                f"fraction-evaluate=0.0 local-eval=false out-dir='{out}' round-timeout=300.0"
            )
            history = flower.finish(run, out)

        for round_ in history["rounds"][1:]:
            assert sorted(round_["accepted"]) == ["site0", "site1"], round_
            train = round_["train_metrics"]  # weighted means over the two nodes
            # both nodes mined their galleries (no captions): on average at least two crops
            # per tracklet, so the visits were linked
            assert 0 < train["pl-tracklets"] <= VISITS * CROPS_PER_VISIT / 2, train
            assert "pl-precision" not in train  # a site has no truth to score against
        final = read_manifest(out / "final")
        assert sorted(history["handover"]) == ["site0", "site1"]
        for i, daemon in enumerate(daemons):
            handed = read_manifest(daemon.adapter_dir / "federated")
            assert handed.adapter_fingerprint == final.adapter_fingerprint
            wait_until(
                f"{daemon.node_id} to hot-swap the federated adapter",
                lambda d=daemon, v=handed.model_version: d.status().model_version == v,
                60,
                [daemon],
            )
            status = daemon.status()
            assert status.model_version != before[i]
            assert status.index_version == status.model_version  # gallery re-embedded
            assert status.indexed_size == VISITS * CROPS_PER_VISIT
    finally:
        for daemon in daemons:
            daemon.stop()
