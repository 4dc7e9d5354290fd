"""Who may call a service: the one server interceptor (`RpcGuard`) and TLS/mTLS credentials.

Why an interceptor: the check must cover every RPC, including ones added later, without a
line in each servicer method. It refuses with UNAUTHENTICATED *before anything is
deserialized*: the refusal handler has no request deserializer, so an anonymous caller's
bytes never reach protobuf parsing (or any other code of the service).

Which methods are open (callable without a token):
- Health (`/grpc.health.v1.Health/`), always: load balancers, systemd and the broker's
  own probes carry no token.
- Reflection is each service's choice, passed as `open_prefixes`. The broker opens it
  (`REFLECTION_PREFIX`): it is the operators' front door, its API is public
  (protos/broker.proto) and `grpcurl list/describe` should work before a token is at
  hand. A node keeps it behind the token: only the broker and the node's admins talk to
  it, so an anonymous caller on a site network learns nothing beyond "it is alive".
- Everything else, unknown method names included (an anonymous caller is not told which
  methods exist), needs `authorization: Bearer <token>`.

The same interceptor also runs on open servers (no tokens; a node or broker started with
`allow-unauthenticated = true`): it guards every method's request decoding
(`common.rpc.decoding`: undecodable bytes are INVALID_ARGUMENT, not INTERNAL with a
traceback), and its `on_refused` hook counts refused authentications.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from common.errors import ConfigError, short_repr
from common.rpc.decoding import guard_decoding

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
_SCHEME = "Bearer "


def _refusal(message: str) -> Callable[[Any, grpc.ServicerContext], None]:
    def refuse(_request_or_iterator: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return refuse


def _deny_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape that refuses the call; it has no request
    deserializer (the raw bytes are never parsed) and never answers, so no serializer."""
    refuse = _refusal(message)
    request_streaming = bool(handler and handler.request_streaming)
    response_streaming = bool(handler and handler.response_streaming)
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


OnRefused = Callable[[str, str], None]  # (method, reason: "missing" | "wrong")


class RpcGuard(grpc.ServerInterceptor):
    """The one interceptor every server installs: the token check (when `tokens` are
    given), refusal of undecodable request bytes (`common.rpc.decoding`) and a hook that
    counts refused authentications.

    `tokens`: every accepted token (the offered one is compared in constant time against
    each of them, so timing does not tell which matched); none: an open server (no token
    check, decoding still guarded). `open_prefixes`: method-name prefixes callable without
    a token, in addition to health (always open). `token_name` words the refusal
    ("missing operator token: ..."). `on_refused(method, reason)` runs once per refused
    call (the daemons' Prometheus counters).
    """

    def __init__(
        self,
        tokens: Sequence[str] = (),
        *,
        open_prefixes: Sequence[str] = (),
        token_name: str = "bearer",
        on_refused: OnRefused | None = None,
    ) -> None:
        if isinstance(tokens, str):  # a str would be taken as one token per character
            raise TypeError(f"{type(self).__name__} takes a tuple of tokens, not one str")
        if not all(tokens):
            raise ValueError(f"{type(self).__name__}: a token is empty")
        self._tokens = tuple(t.encode() for t in tokens)
        self._open = (HEALTH_PREFIX, *open_prefixes)
        self._token_name = token_name
        self._on_refused = on_refused

    @property
    def checks_tokens(self) -> bool:
        return bool(self._tokens)

    def _refusal_reason(self, metadata: Sequence[Any] | None) -> str | None:
        """None when a valid token is offered, else "missing" or "wrong"."""
        given: str | bytes = ""
        for key, value in metadata or ():
            if key == "authorization":
                given = value
                break
        if isinstance(given, bytes):
            given = given.decode(errors="replace")
        if not given:
            return "missing"
        offered = given[len(_SCHEME) :].strip().encode() if given.startswith(_SCHEME) else b""
        matched = False
        for token in self._tokens:  # no short cut: every token is compared
            matched |= hmac.compare_digest(offered, token)
        return None if matched else "wrong"

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self._tokens or method.startswith(self._open):
            return self._guarded(continuation(handler_call_details), method)
        reason = self._refusal_reason(handler_call_details.invocation_metadata)
        if reason is None:
            return self._guarded(continuation(handler_call_details), method)
        # the method name is the caller's: quoted and cut short, it cannot forge a line
        log.warning("refused %s: %s %s token", short_repr(method, 80), reason, self._token_name)
        if self._on_refused is not None:
            self._on_refused(method, reason)
        # continuation only looks the handler up (for its streaming shape); nothing is read
        return _deny_handler(
            continuation(handler_call_details),
            f"{reason} {self._token_name} token: send metadata 'authorization: Bearer <token>'",
        )

    @staticmethod
    def _guarded(handler: grpc.RpcMethodHandler | None, method: str):
        # None: no such method; grpc answers UNIMPLEMENTED without reading the request
        return None if handler is None else guard_decoding(handler, method)


class BearerTokenAuth(RpcGuard):
    """An `RpcGuard` that must check tokens: refuse (UNAUTHENTICATED) every call outside
    the open methods whose `authorization` metadata is not `Bearer <one of tokens>`."""

    def __init__(self, tokens: Sequence[str], **kwargs: Any) -> None:
        if isinstance(tokens, str):
            raise TypeError("BearerTokenAuth takes a tuple of tokens, not one str")
        if not tokens or not all(tokens):
            raise ValueError("BearerTokenAuth needs one or more non-empty tokens")
        super().__init__(tokens, **kwargs)


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"tls {what}: cannot read {path}: {err}") from err


def server_credentials(
    cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None (plaintext) when `cert` is not set.

    A `client_ca` makes it mTLS: clients must present a certificate signed by it. None
    and "" both mean "not set"; `cert` and `key` go together.
    """
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("tls: the certificate and its key must be given together")
    return grpc.ssl_server_credentials(
        [(_read_pem(key, "key"), _read_pem(cert, "cert"))],
        root_certificates=_read_pem(client_ca, "client CA") if client_ca else None,
        require_client_auth=bool(client_ca),
    )
