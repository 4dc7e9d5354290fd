"""Issue 17 on a real node: secure by default, undecodable bytes, log forging, bounded input,
huge query vectors, and a start-up log without faiss's loader chatter."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from node_fixtures import AUTH, TOKEN, gallery_items, ingest, make_config

from common.errors import ConfigError
from edge_node.config import AuthSettings, Limits, load_node_config, node_config_from_dict
from edge_node.serving.daemon import KeyValueFormatter
from protos import node_pb2, retrieval_pb2

REPO = Path(__file__).resolve().parents[2]
QUERY = "a person in a red jacket"
MAX_DETAILS = 512


def _refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=30, **kwargs)
    return err.value


# ------------------------------------------------------------------ 1. open by default
@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051", "cam:1"])
def test_open_node_beyond_loopback_is_refused_at_config_load_naming_the_keys(tmp_path, listen):
    with pytest.raises(ConfigError) as err:
        node_config_from_dict({"node-id": "n1", "data-dir": "d", "listen": listen}, tmp_path)
    message = str(err.value)
    for key in ("listen", "token-file", "tls-client-ca", "allow-unauthenticated"):
        assert key in message, (key, message)


def test_credentials_or_an_explicit_opt_out_allow_a_site_address(tmp_path: Path):
    (tmp_path / "ca.pem").write_text("x")
    base = {"node-id": "n1", "data-dir": "d", "listen": "0.0.0.0:50051"}
    for auth in (
        {"token": "s3cret"},
        {"tls-cert": "ca.pem", "tls-key": "ca.pem", "tls-client-ca": "ca.pem"},  # mTLS
        {"allow-unauthenticated": True},
    ):
        config = node_config_from_dict({**base, "auth": auth}, tmp_path)
        assert config.listen == "0.0.0.0:50051"
    tls_only = {"tls-cert": "ca.pem", "tls-key": "ca.pem"}  # encrypts, but anyone may call
    with pytest.raises(ConfigError, match="allow-unauthenticated"):
        node_config_from_dict({**base, "auth": tls_only}, tmp_path)
    for loopback in ("127.0.0.1:0", "localhost:50051", "[::1]:50051"):
        assert node_config_from_dict({**base, "listen": loopback}, tmp_path).listen == loopback


def test_example_file_is_safe_by_default():
    config = load_node_config(REPO / "edge_node" / "node.example.toml")
    assert config.listen.startswith("127.0.0.1:")
    assert not config.auth.allow_unauthenticated


def test_an_open_node_warns_loudly_at_start_even_on_loopback(serve_node, caplog):
    caplog.set_level(logging.INFO)
    serve_node(auth=AuthSettings(token=TOKEN))
    assert not [r for r in caplog.records if "WITHOUT authentication" in r.getMessage()]
    serve_node(auth=AuthSettings())  # loopback, no credentials: allowed, but never quietly
    warnings = [r for r in caplog.records if "WITHOUT authentication" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


# ------------------------------------------------------------------ 2. bytes and refusals
UNDECODABLE = [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08", b"\x12\x80\x80\x80\x80\x80\x80"]


@pytest.mark.parametrize("token", [TOKEN, ""])
def test_undecodable_bytes_are_invalid_argument_without_a_traceback(serve_node, caplog, token):
    served = serve_node(auth=AuthSettings(token=token))
    caplog.set_level(logging.DEBUG)
    for method in ("Search", "Ingest", "GetThumbnail", "Status"):
        call = served.channel.unary_unary(f"/fedretrieve.v1.NodeService/{method}")
        for data in UNDECODABLE:
            if method == "Status":  # StatusRequest has no fields: only bad wire format fails
                data = b"\xff\xff\xff\xff"
            caplog.clear()
            err = _refused(call, data, metadata=AUTH)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, data, err.details())
            assert "does not decode" in err.details() and len(err.details()) < MAX_DETAILS
            assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
            assert len(caplog.records) <= 1
    assert served.stub.Status(node_pb2.StatusRequest(), metadata=AUTH, timeout=30).node_id


def test_refused_authentications_are_counted(serve_node):
    served = serve_node()
    registry = served.node.metrics.registry
    for metadata, reason in (((), "missing"), ((("authorization", "Bearer nope"),), "wrong")):
        for _ in range(2):
            err = _refused(served.stub.Status, node_pb2.StatusRequest(), metadata=metadata)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        sample = registry.get_sample_value(
            "fedretrieve_node_auth_refused_total", {"reason": reason}
        )
        assert sample == 2.0, reason


# ------------------------------------------------------------------ 3. log forging
def test_query_id_with_a_newline_is_refused_and_never_logged_raw(serve_node):
    served = serve_node()
    ingest(served, gallery_items(4))
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(KeyValueFormatter("node-a", as_json=False))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        forged = "q1\n2026-01-01T00:00:00.000 INFO edge_node node=node-a: FORGED"
        for query_id in (forged, "a b", "x" * 65, "q1\n"):
            err = _refused(
                served.stub.Search,
                node_pb2.SearchRequest(text=QUERY, k=3, query_id=query_id),
                metadata=AUTH,
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "query_id" in err.details()
        ok = served.stub.Search(
            node_pb2.SearchRequest(text=QUERY, k=3, query_id="op-42.a_b"), metadata=AUTH
        )
        assert ok.hits
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert not [line for line in lines if "FORGED" in line or "\n" in line.split(": ", 1)[0]]
    assert any("query_id=op-42.a_b" in line for line in lines)


# ------------------------------------------------------------------ 4. bounded input
def test_over_long_or_unprintable_file_names_are_refused_before_anything_is_stored(serve_node):
    served = serve_node()
    good = gallery_items(3)
    db = served.config.data_dir / "gallery" / "catalog.sqlite"
    cases = {
        "10 MB name": "n" * 10_000_000,
        "escape sequence": "\x1b[2J\x1b[31mred.jpg",
        "newline": "a\nb.jpg",
        "bidi override": "gpj.\u202eexe",
        "path": "../../etc/passwd",
        "absolute": "/etc/cam1.jpg",
        "backslash": "cam1\\x.jpg",
    }
    for case, name in cases.items():
        items = [*good[:2], node_pb2.ImageItem(**{**_fields(good[2]), "file_name": name})]
        err = _refused(served.stub.Ingest, node_pb2.IngestRequest(images=items), metadata=AUTH)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert "image #2" in err.details() and len(err.details()) < MAX_DETAILS, case
        assert "\n" not in err.details() and "\x1b" not in err.details()
    assert len(served.node.gallery) == 0 and served.node.gallery.rejected_count == 0
    assert db.stat().st_size < 1_000_000
    assert len(ingest(served, good)) == 3  # the same images with their own names are fine


def test_folder_names_inside_a_file_name_are_fine(serve_node):
    """A camera export's relative path ("c01/00002_c01_00.jpg") is a name, not a path on the
    node (images are stored by content hash): the simulation ingests exactly such names."""
    served = serve_node()
    items = gallery_items(2)
    named = [
        node_pb2.ImageItem(**{**_fields(item), "file_name": f"imgs/test/c01/{i:05d}.jpg"})
        for i, item in enumerate(items)
    ]
    assert len(ingest(served, named)) == 2


def _fields(item: node_pb2.ImageItem) -> dict:
    return {
        "data": item.data,
        "camera_id": item.camera_id,
        "timestamp_ms": item.timestamp_ms,
        "captions": list(item.captions),
        "file_name": item.file_name,
    }


def test_caption_and_camera_limits_come_from_config(serve_node):
    served = serve_node(limits=Limits(max_captions=2, max_caption_chars=10, max_camera_id_chars=8))
    base = _fields(gallery_items(1)[0])
    for override, needle in (
        ({"captions": ["a", "b", "c"]}, "max-captions 2"),
        ({"captions": ["x" * 11]}, "max-caption-chars 10"),
        ({"camera_id": "c" * 9}, "max-camera-id-chars 8"),
    ):
        request = node_pb2.IngestRequest(images=[node_pb2.ImageItem(**{**base, **override})])
        err = _refused(served.stub.Ingest, request, metadata=AUTH)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.details()
    assert served.node.gallery.rejected_count == 0


def test_thousands_of_unknown_camera_ids_give_a_short_invalid_argument(serve_node):
    served = serve_node()
    ingest(served, gallery_items(3))
    for count, needle in ((200, "(+195 more)"), (5_000, "max-camera-ids")):
        cameras = [f"unknown-camera-{i:05d}" for i in range(count)]
        request = node_pb2.SearchRequest(
            text=QUERY, k=3, filters=retrieval_pb2.Filters(camera_ids=cameras)
        )
        err = _refused(served.stub.Search, request, metadata=AUTH)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.code()
        assert needle in err.details() and len(err.details()) < MAX_DETAILS
    long_id = retrieval_pb2.Filters(camera_ids=["c" * 100_000])
    err = _refused(
        served.stub.Search, node_pb2.SearchRequest(text=QUERY, k=3, filters=long_id), metadata=AUTH
    )
    assert "max-camera-id-chars" in err.details() and len(err.details()) < MAX_DETAILS


def test_config_refuses_a_bad_file_name_charset(tmp_path: Path):
    with pytest.raises(ConfigError, match="file-name-charset"):
        node_config_from_dict(
            {"node-id": "n", "data-dir": "d", "limits": {"file-name-charset": "any"}}, tmp_path
        )
    config = make_config(tmp_path, limits=Limits(file_name_charset="portable"))
    assert config.limits.file_name_charset == "portable"


# ------------------------------------------------------------------ 5. huge vectors
def test_a_huge_finite_query_vector_scores_like_its_unit_vector(serve_node):
    served = serve_node()
    ingest(served, gallery_items(6))
    gen = served.node.active
    unit = gen.backend.encode_text([QUERY])[0].astype(np.float32)
    unit = unit / np.linalg.norm(unit)

    def search(values) -> node_pb2.SearchResponse:
        vector = retrieval_pb2.QueryVector(values=list(values), model_version=gen.version)
        return served.stub.Search(
            node_pb2.SearchRequest(vector=vector, k=6), metadata=AUTH, timeout=30
        )

    reference = search(unit)
    scaled = (unit / np.abs(unit).max()).astype(np.float32) * np.float32(3e38)
    assert np.isfinite(scaled).all() and np.abs(scaled).max() == np.float32(3e38)
    huge = search(scaled)
    assert huge.used_vector and [h.image_id for h in huge.hits] == [
        h.image_id for h in reference.hits
    ]
    np.testing.assert_allclose(
        [h.score for h in huge.hits], [h.score for h in reference.hits], atol=1e-5
    )
    assert any(abs(h.score) > 1e-3 for h in huge.hits)
    for bad in ([float("inf")] + [0.0] * (len(unit) - 1), [float("nan")] * len(unit)):
        err = _refused(
            served.stub.Search,
            node_pb2.SearchRequest(
                vector=retrieval_pb2.QueryVector(values=bad, model_version=gen.version), k=3
            ),
            metadata=AUTH,
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ 6. faiss loader lines
def test_daemon_logging_set_up_hides_faiss_loader_chatter(tmp_path: Path):
    script = f"""
import logging, sys
logging.basicConfig(level=logging.INFO)  # as `fedretrieve` does before `node serve`
from edge_node.config import NodeConfig
from edge_node.serving.daemon import configure_logging
configure_logging(NodeConfig(node_id="n1", data_dir={str(tmp_path)!r}))
import edge_node.serving.node  # loads faiss
logging.getLogger("check").info("after faiss")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "after faiss" in done.stderr  # INFO lines still reach the log
    assert "faiss.loader" not in done.stderr and "ModuleNotFoundError" not in done.stderr
