"""Adapter hot swap while a client searches: no failed search, the switch happens, and every
answer's reported version matches the embeddings that produced it."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from node_fixtures import AUTH, gallery_items, ingest
from PIL import Image

from common.adapters import WEIGHTS_FILE, read_manifest
from common.factory import create_model
from protos import node_pb2, retrieval_pb2

QUERY = "a woman in a green top and black trousers"


def expected_ranking(model, items, ids, k: int) -> list[int]:
    images = [Image.open(io.BytesIO(it.data)).convert("RGB") for it in items]
    scores = model.encode_images(images).numpy() @ model.encode_text([QUERY]).numpy()[0]
    return sorted(ids, key=lambda i: (-scores[ids.index(i)], i))[:k]


def test_hot_swap_under_search_load(serve_node, tmp_path: Path, write_adapter):
    served = serve_node()
    items = gallery_items(20)
    ids = ingest(served, items)
    base = create_model("tiny")
    old_version = served.node.active.version
    assert old_version == base.version

    # the broker may send a vector made by the old global model: valid only before the swap
    old_vector = retrieval_pb2.QueryVector(
        values=base.encode_text([QUERY]).numpy()[0].tolist(), model_version=old_version
    )
    # (reply version, used_vector, hit ids, the versions stamped on the hits)
    answers: list[tuple[str, bool, list[int], set[str]]] = []
    errors: list[grpc.RpcError] = []
    crashed: list[BaseException] = []  # anything else the client thread raised
    stop = threading.Event()

    def client() -> None:
        try:
            while not stop.is_set():
                try:
                    reply = served.stub.Search(
                        node_pb2.SearchRequest(text=QUERY, vector=old_vector, k=5),
                        metadata=AUTH,
                        timeout=10,
                    )
                except grpc.RpcError as err:
                    errors.append(err)
                    continue
                answers.append(
                    (
                        reply.model_version,
                        reply.used_vector,
                        [h.image_id for h in reply.hits],
                        {h.model_version for h in reply.hits},
                    )
                )
        except BaseException as err:  # reaches the test below instead of dying unseen
            crashed.append(err)

    def wait_for(what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert not crashed, f"the search client crashed: {crashed[0]!r}"
            assert thread.is_alive(), "the search client stopped"
            assert time.monotonic() < deadline, (
                f"no {what} within {timeout:.0f} s: {len(answers)} answers, "
                f"{len(errors)} errors {[e.details() for e in errors[:3]]}"
            )
            time.sleep(0.01)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        wait_for("5 answers before the swap", lambda: len(answers) >= 5, 60)
        new_version = write_adapter(served.config.adapter_dir / "round-1", round_=1)
        # the swap, then a few answers on the new pair (at least 10 in all)
        wait_for(
            f"3 answers on {new_version} after the swap",
            lambda: sum(a[0] == new_version for a in answers) >= 3 and len(answers) >= 10,
            60,
        )
    finally:
        stop.set()
        thread.join(timeout=30)  # one Search in flight at most, itself under a 10 s timeout
    assert not thread.is_alive(), "the search client did not stop"
    assert not crashed, crashed
    assert not errors, [e.details() for e in errors]
    assert len(answers) >= 10
    versions = [v for v, _, _, _ in answers]
    assert versions[0] == old_version and versions[-1] == new_version
    switch = versions.index(new_version)
    assert set(versions[:switch]) == {old_version} and set(versions[switch:]) == {new_version}

    adapted = create_model("tiny", adapter=served.config.adapter_dir / "round-1")
    assert adapted.version == new_version
    want = {
        old_version: expected_ranking(base, items, ids, 5),
        new_version: expected_ranking(adapted, items, ids, 5),
    }
    assert want[old_version] != want[new_version], "the adapter must change the ranking"
    for version, used_vector, hits, hit_versions in answers:
        assert hit_versions == {version}  # every hit stamped with the version that scored it
        assert hits == want[version]  # embeddings used == version reported
        assert used_vector == (version == old_version)  # old vector is ignored after the swap

    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH)
    manifest = read_manifest(served.config.adapter_dir / "round-1")
    assert status.model_version == status.index_version == new_version
    assert status.adapter_version == manifest.adapter_version
    assert not status.reindex.running
    assert (status.reindex.done, status.reindex.total, status.reindex.target_version) == (
        20,
        20,
        new_version,
    )
    assert status.indexed_size == 20


def test_bad_adapter_is_refused_and_old_pair_keeps_serving(serve_node, write_adapter):
    served = serve_node()
    ingest(served, gallery_items(8))
    adapters = served.config.adapter_dir
    good_version = write_adapter(adapters / "round-1", round_=1)
    deadline = time.monotonic() + 60
    while served.node.active.version != good_version and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.node.active.version == good_version

    # a newer round whose weights were damaged after saving (checksum no longer matches);
    # staged under a dot-name, which the watcher ignores, then moved in whole
    write_adapter(adapters / ".staging-round-2", round_=2, seed=2)
    weights = adapters / ".staging-round-2" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-16] + bytes(16))
    shutil.move(adapters / ".staging-round-2", adapters / "round-2")
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH)
        if "refused" in status.backend_note:
            break
        time.sleep(0.05)
    assert "round-2" in status.backend_note and "checksum" in status.backend_note
    assert status.model_version == good_version
    reply = served.stub.Search(node_pb2.SearchRequest(text=QUERY, k=3), metadata=AUTH)
    assert reply.model_version == good_version and len(reply.hits) == 3
    assert np.isfinite([h.score for h in reply.hits]).all()
