"""Who may call the node: a bearer-token interceptor and TLS/mTLS server credentials.

Why an interceptor: the check must cover every RPC, including ones added later, without a
line in each servicer method. Health checks stay open (a load balancer or systemd probe has
no token); everything else, reflection included, needs `authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

from edge_node.config import AuthSettings

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that refuses the call."""

    def deny(_request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse (UNAUTHENTICATED) any call whose `authorization` metadata is not the token."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()
        self._open = open_prefixes

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._open):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if isinstance(given, bytes):
            given = given.decode(errors="replace")
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        if hmac.compare_digest(given.encode(), self._expected):
            return handler
        reason = "missing" if not given else "wrong"
        log.warning("refused %s: %s bearer token", method, reason)
        return _deny_handler(
            handler, f"{reason} bearer token: send metadata 'authorization: Bearer <token>'"
        )


def server_credentials(auth: AuthSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (mTLS when a client CA is set);
    None for plaintext."""
    if not auth.tls_cert:
        return None
    key = Path(auth.tls_key).read_bytes()
    cert = Path(auth.tls_cert).read_bytes()
    ca = Path(auth.tls_client_ca).read_bytes() if auth.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )
