"""`[camera-norm]` on a real node (tiny model, real faiss index, real gallery on tmp_path):
crops are embedded normalised, the statistics survive a restart (and their loss), crossing
`min-images` re-fits once through the hot-swap path, and off means today's vectors."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from node_fixtures import AUTH, ingest, make_config, person_crop
from PIL import Image

from common.camera_norm import CameraNorm
from edge_node.accel.backend import load_backend
from edge_node.config import CameraNormSettings, NodeConfig
from edge_node.serving.camera_stats import STATS_FILE, GalleryCameraStats, refit_due
from edge_node.serving.domain import SearchQuery
from edge_node.serving.gallery import IngestItem
from edge_node.serving.hotswap import latest_adapter
from edge_node.serving.indexer import META_FILE
from edge_node.serving.node import Node
from protos import node_pb2, retrieval_pb2

SODIUM = (1.0, 0.7, 0.3)  # a strong orange cast: most of the blue and some green gone
QUERY = "a person in a red top"


def scene(seed: int, cast: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> bytes:
    """One synthetic crop as PNG (lossless, so the cast is exact), under a light `cast`."""
    pixels = np.asarray(Image.open(io.BytesIO(person_crop(seed))).convert("RGB"), np.float32)
    lit = np.clip(pixels * np.asarray(cast, np.float32) + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(lit).save(buf, format="PNG")
    return buf.getvalue()


def items(camera: str, seeds: range, cast=(1.0, 1.0, 1.0)) -> list[IngestItem]:
    return [IngestItem(scene(s, cast), camera, 1_700_000_000_000 + s, (), f"{camera}-{s}.png")
            for s in seeds]  # fmt: skip


def norm_config(tmp_path: Path, min_images: int, enabled: bool = True) -> NodeConfig:
    # adapter-poll-s is also the re-fit timer: an hour, so the tests decide when it runs
    cn = CameraNormSettings(enabled=enabled, min_images=min_images, refit_change=0.05)
    return make_config(tmp_path, camera_norm=cn, adapter_poll_s=3600.0, adapter_dir=None)


class CountingBackend:
    """The real backend, counting the crops it embeds."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.images = 0

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        self.images += len(images)
        return self._inner.encode_images(images)


def open_node(config: NodeConfig) -> tuple[Node, list[CountingBackend], list[int]]:
    """A started node whose backends count embedded crops and whose gallery counts reads."""
    backends: list[CountingBackend] = []

    def factory(adapter: Path | None) -> CountingBackend:
        backends.append(CountingBackend(load_backend("torch", config.model, adapter, "cpu")))
        return backends[-1]

    node = Node.open(config, factory)
    reads: list[int] = []
    load: Callable[[int], Image.Image] = node.gallery.load_image
    node.gallery.load_image = lambda image_id: (reads.append(image_id), load(image_id))[1]
    node.start()
    return node, backends, reads


def add(node: Node, new: list[IngestItem]) -> list[int]:
    outcomes = node.ingest(new)
    assert all(o.accepted for o in outcomes), [o.reason for o in outcomes]
    assert node.wait_indexed(60)
    return [o.image_id for o in outcomes]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def chroma_gap(a: Image.Image, b: Image.Image) -> float:
    """Mean per-pixel difference of chromaticity (r, g, b) / (r + g + b): colour, not light
    level (gray-world keeps a camera's brightness and removes its tint)."""
    x, y = (np.asarray(i, np.float64) + 1.0 for i in (a, b))
    return float(np.abs(x / x.sum(-1, keepdims=True) - y / y.sum(-1, keepdims=True)).mean())


def saved_stats(node: Node) -> dict:
    return json.loads((node.index_dir / STATS_FILE).read_text())["stats"]["counts"]


# ---------------------------------------------------------------------- pure pieces
def test_refit_is_due_for_a_new_camera_or_a_drift_beyond_the_threshold():
    a = CameraNorm({"c1": (1.0, 1.0, 1.0)}, {"c1": 20})
    assert not refit_due(a, a, 0.05)
    assert refit_due(a, CameraNorm({"c1": (1.0, 1.0, 1.0), "c2": (2.0, 1.0, 0.5)}), 0.05)
    assert refit_due(CameraNorm(), a, 0.05)  # the first camera to reach min-images
    assert not refit_due(a, CameraNorm({"c1": (1.04, 1.0, 1.0)}), 0.05)  # 3.8 % < 5 %
    assert refit_due(a, CameraNorm({"c1": (1.06, 1.0, 1.0)}), 0.05)  # 5.7 % > 5 %


def test_statistics_count_each_crop_once_and_reload_their_ids(tmp_path: Path):
    stats = GalleryCameraStats()
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert stats.observe(1, "c1", img) and not stats.observe(1, "c1", img)  # once per id
    for image_id in (2, 3, 7):
        stats.observe(image_id, "c1", img)
    assert stats.uncounted(np.arange(1, 9)).tolist() == [4, 5, 6, 8]
    stats.save(tmp_path)
    assert json.loads((tmp_path / STATS_FILE).read_text())["counted"] == [[1, 3], [7, 7]]
    again = GalleryCameraStats.load(tmp_path, gallery_size=4)
    assert len(again) == 4 and again.counts() == {"c1": 4}
    four, five = CameraNormSettings(min_images=4), CameraNormSettings(min_images=5)
    assert again.norm(four) == stats.norm(four) and again.norm(five).version == "none"


# ---------------------------------------------------------------------- (a) enabled
def test_cast_crops_are_embedded_normalised_and_move_towards_their_uncast_copies(
    tmp_path: Path,
):
    node, backends, _ = open_node(norm_config(tmp_path, min_images=6))
    try:
        sodium = add(node, items("sodium", range(8), SODIUM))
        daylight = add(node, items("daylight", range(8)))
        plain = node.active
        assert plain.norm.version == "none"  # statistics were gathered while embedding
        assert node.check_camera_norm()  # both cameras reached min-images: one re-fit
        gen = node.active
        gain = gen.norm.gain("sodium")
        assert gain is not None and gain[2] / gain[0] > 2.5  # blue lifted against red
        assert gen.version == plain.version  # same model: query vectors stay valid
        assert gen.index.version == f"{plain.version}+{gen.norm.version}"

        backend = backends[0]
        for image_id in sodium:
            crop = node.gallery.load_image(image_id)
            want = backend.encode_images([gen.norm.apply(crop, "sodium")])[0]
            raw = backend.encode_images([crop])[0]
            assert cosine(want, raw) < 0.999  # the normalisation changed the vector
            hit = node.search(SearchQuery(vector=want, vector_version=gen.version, k=1))
            assert hit.used_vector and hit.hits[0].image_id == image_id
            assert hit.hits[0].score > 1 - 1e-5  # the index holds the normalised crop's vector
            found = node.embed_image(image_id)  # find similar uses the same gains
            assert cosine(found.vector, want) > 1 - 1e-5

        # the crops themselves: each cast crop's colours are nearer its uncast copy's once
        # both are normalised; and so, on average, are their vectors (a random tiny model
        # is noisy)
        before, after = [], []
        for cast_id, plain_id in zip(sodium, daylight, strict=True):
            cast, uncast = node.gallery.load_image(cast_id), node.gallery.load_image(plain_id)
            fixed = gen.norm.apply(cast, "sodium"), gen.norm.apply(uncast, "daylight")
            assert chroma_gap(*fixed) < chroma_gap(cast, uncast) / 10
            raw = backend.encode_images([cast, uncast])
            before.append(cosine(raw[0], raw[1]))
            after.append(
                cosine(node.embed_image(cast_id).vector, node.embed_image(plain_id).vector)
            )
        assert np.mean(after) > np.mean(before), (before, after)
    finally:
        node.close()


# ---------------------------------------------------------------------- (b) persisted
def test_statistics_and_gains_persist_across_a_restart_without_re_embedding(tmp_path: Path):
    config = norm_config(tmp_path, min_images=4)
    node, _, _ = open_node(config)
    try:
        add(node, items("sodium", range(6), SODIUM) + items("daylight", range(6, 12)))
        assert node.check_camera_norm()
        version, norm_version = node.active.index.version, node.active.norm.version
    finally:
        node.close()
    assert saved_stats(node) == {"daylight": 6, "sodium": 6}
    meta = json.loads((node.index_dir / META_FILE).read_text())
    assert meta["version"] == version and meta["camera_norm"]["version"] == norm_version

    node, backends, reads = open_node(config)
    try:
        assert node.wait_indexed(60)
        assert node.active.index.version == version and node.active.norm.version == norm_version
        assert len(node.active.index) == 12
        assert not node.check_camera_norm()  # same statistics, same gains: nothing to do
        assert backends[0].images == 0 and reads == []  # nothing re-embedded nor re-read
        # a crop ingested now is counted, normalised with the saved gains, and saved
        add(node, items("sodium", range(20, 21), SODIUM))
        assert backends[0].images == 1 and node.active.norm.version == norm_version
    finally:
        node.close()
    assert saved_stats(node) == {"daylight": 6, "sodium": 7}


# ---------------------------------------------------------------------- (c) re-fit
def test_crossing_min_images_refits_once_and_keeps_the_query_model_version(serve_node):
    cn = CameraNormSettings(enabled=True, min_images=20, refit_change=0.05)
    served = serve_node(camera_norm=cn, adapter_poll_s=3600.0)
    node = served.node
    crops = [
        node_pb2.ImageItem(data=scene(s, SODIUM), camera_id="sodium", timestamp_ms=s + 1)
        for s in range(20)
    ]
    ingest(served, crops[:19])
    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH)
    model = status.model_version
    assert status.camera_norm_version == "none" and status.index_version == model
    assert not node.check_camera_norm()  # 19 < min-images: nothing to re-fit
    vector = retrieval_pb2.QueryVector(  # the broker's pre-embedded query
        values=node.active.backend.encode_text([QUERY])[0].tolist(), model_version=model
    )

    ingest(served, crops[19:])
    assert node.check_camera_norm()  # the 20th crop: one re-fit and swap
    assert not node.check_camera_norm()  # and only one
    status = served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH)
    assert status.camera_norm_version.startswith("cn-")
    assert status.camera_norm_version == node.active.norm.version
    assert status.index_version == f"{model}+{status.camera_norm_version}"
    assert status.model_version == model  # the text tower did not change
    assert (status.reindex.done, status.reindex.total) == (20, 20)
    assert status.reindex.target_version == status.index_version
    assert status.indexed_size == 20
    reply = served.stub.Search(
        node_pb2.SearchRequest(text=QUERY, vector=vector, k=3), metadata=AUTH, timeout=10
    )
    assert reply.used_vector and reply.model_version == model and len(reply.hits) == 3


# ---------------------------------------------------------------------- (d) disabled
def test_disabled_embeds_exactly_todays_vectors_and_keeps_no_statistics(tmp_path: Path):
    node, backends, _ = open_node(norm_config(tmp_path, min_images=2, enabled=False))
    try:
        ids = add(node, items("sodium", range(6), SODIUM) + items("daylight", range(6)))
        assert not node.check_camera_norm()
        gen = node.active
        assert gen.norm == CameraNorm() and gen.index.version == gen.version
        status = node.status()
        assert status.camera_norm_version == "" and status.index_version == status.model_version
        for image_id in ids:
            want = backends[0].encode_images([node.gallery.load_image(image_id)])[0]
            hit = node.search(SearchQuery(vector=want, vector_version=gen.version, k=1))
            assert hit.hits[0].image_id == image_id and hit.hits[0].score > 1 - 1e-6
            assert np.array_equal(node.embed_image(image_id).vector, want)
    finally:
        node.close()
    assert not (node.index_dir / STATS_FILE).exists()
    assert "camera_norm" not in json.loads((node.index_dir / META_FILE).read_text())


# ---------------------------------------------------------------------- (e) lost stats
CORRUPT = {
    "garbage": b"\x00\xffnot json at all",
    "truncated": b'{"stats": {"format": 1, "sums": {"sodium": [1.0, 2.0',
    "counts disagree": json.dumps(  # one image in the sums, five ids counted
        {
            "stats": {"format": 1, "sums": {"c": [9.0, 9.0, 9.0]}, "counts": {"c": 1}},
            "counted": [[1, 5]],
        }
    ).encode(),
}


@pytest.mark.parametrize("damage", list(CORRUPT))
def test_unreadable_statistics_warn_and_are_recomputed_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
):
    config = norm_config(tmp_path, min_images=4)
    node, _, _ = open_node(config)
    try:
        add(node, items("sodium", range(6), SODIUM) + items("daylight", range(6, 12)))
        assert node.check_camera_norm()
        version = node.active.index.version
    finally:
        node.close()
    counts = saved_stats(node)
    (node.index_dir / STATS_FILE).write_bytes(CORRUPT[damage])

    with caplog.at_level(logging.WARNING, logger="edge_node.serving.camera_stats"):
        node, backends, reads = open_node(config)
    try:
        assert any("camera statistics" in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records), caplog.text  # fmt: skip
        assert node.wait_indexed(60)  # waits for the recount too
        assert node.active.index.version == version  # the index itself was kept
        assert not node.check_camera_norm()  # recomputed: the same gains, no re-fit
        assert sorted(reads) == list(range(1, 13)) and backends[0].images == 0
    finally:
        node.close()
    assert saved_stats(node) == counts


# ---------------------------------------------------------------------- with an adapter swap
def test_a_new_adapter_is_embedded_with_the_current_gains(tmp_path: Path, write_adapter):
    config = norm_config(tmp_path, min_images=4)
    node, _, _ = open_node(config)
    try:
        add(node, items("sodium", range(6), SODIUM))
        assert node.check_camera_norm()
        norm = node.active.norm
        new_version = write_adapter(tmp_path / "round-1", round_=1)
        candidate = latest_adapter(tmp_path / "round-1")
        assert candidate is not None and node.switch_adapter(candidate)
        gen = node.active
        assert gen.version == new_version and gen.norm == norm  # one swap, both changes
        assert gen.index.version == f"{new_version}+{norm.version}" and len(gen.index) == 6
        assert not node.check_camera_norm()
    finally:
        node.close()
