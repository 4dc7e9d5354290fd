"""TLS and mTLS from configured PEM files (certificates made with the openssl CLI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from edge_node.config import AuthSettings
from protos import node_pb2, node_pb2_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
                cwd=d)  # fmt: skip


def test_mtls_requires_a_client_certificate(serve_node, tmp_path: Path):
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    auth = AuthSettings(
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem"),
    )
    served = serve_node(auth=auth)  # no token: certificates are the credential here
    ca = (pki / "ca.pem").read_bytes()
    target = f"127.0.0.1:{served.port}"

    with_cert = grpc.ssl_channel_credentials(
        ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
    )
    with grpc.secure_channel(target, with_cert) as channel:
        status = node_pb2_grpc.NodeServiceStub(channel).Status(node_pb2.StatusRequest(), timeout=10)
    assert status.node_id == "node-a"

    without_cert = grpc.ssl_channel_credentials(ca)
    with grpc.secure_channel(target, without_cert) as channel, pytest.raises(grpc.RpcError) as err:
        node_pb2_grpc.NodeServiceStub(channel).Status(node_pb2.StatusRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError):
        node_pb2_grpc.NodeServiceStub(channel).Status(node_pb2.StatusRequest(), timeout=5)
