"""The committed generated modules are exactly what `python -m protos.generate` produces.

Why: generated files are never edited by hand; a .proto change without regenerating (or a
hand edit) would make the wire format and the Python modules disagree silently.
"""

from __future__ import annotations

from pathlib import Path

from protos import generate

GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def test_generated_modules_match_protos(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert produced, "protoc produced nothing"
    expected = {
        Path("protos") / (proto.stem + suffix)
        for proto in generate.proto_files()
        for suffix in GENERATED_SUFFIXES
    }
    assert set(produced) == expected
    for rel in produced:
        committed = generate.ROOT / rel
        assert committed.is_file(), f"{rel} is generated but not committed"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} differs from protoc output; run `python -m protos.generate`"
        )


def test_every_proto_has_committed_modules() -> None:
    for proto in generate.proto_files():
        for suffix in GENERATED_SUFFIXES:
            assert (generate.PROTO_DIR / (proto.stem + suffix)).is_file()


def test_generated_modules_import_and_name_the_package() -> None:
    from protos import broker_pb2, node_pb2, retrieval_pb2

    assert node_pb2.DESCRIPTOR.package == "fedretrieve.v1"
    assert "NodeService" in node_pb2.DESCRIPTOR.services_by_name
    assert broker_pb2.DESCRIPTOR.package == retrieval_pb2.DESCRIPTOR.package == "fedretrieve.v1"
