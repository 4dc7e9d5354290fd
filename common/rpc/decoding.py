"""Undecodable request bytes leave as INVALID_ARGUMENT, with one log line, not a traceback.

Why here: grpcio deserializes the request *before* any servicer code runs. When the
deserializer raises, `grpc._server._receive_message` logs "Exception deserializing
message!" with a full traceback and aborts with INTERNAL "Exception deserializing
request!", a status that says "bug in the server" for what is the caller's mistake, and a
traceback per call that lets any caller fill the log. `guard_decoding(handler)` gives a
handler whose deserializer never raises: a failure becomes an `Undecodable` marker, and
the wrapped behaviour turns that into INVALID_ARGUMENT before the servicer sees anything.
The server's interceptor (`common.rpc.auth.RpcGuard`) applies it to every method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    size: int
    error: str  # the exception's class name (its text can quote the caller's bytes)


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as err:  # parsing caller bytes: every failure is the caller's
            return Undecodable(len(data), type(err).__name__)

    return deserialize


def _refuse(method: str, request: Undecodable, context: grpc.ServicerContext) -> None:
    log.info("undecodable request to %s: %d bytes (%s)", method, request.size, request.error)
    context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request to {method} does not decode as its protobuf message "
        f"({request.size} bytes, {request.error})",
    )


def _unary(method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            _refuse(method, request, context)
        return behaviour(request, context)

    return call


def _streaming(method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            if isinstance(request, Undecodable):
                _refuse(method, request, context)
            yield request

    def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behaviour(checked(requests, context), context)

    return call


def guard_decoding(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` (of any streaming shape) with undecodable requests refused as above."""
    deserializer = _safe(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(method, handler.stream_stream), deserializer, serializer
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _streaming(method, handler.stream_unary), deserializer, serializer
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _unary(method, handler.unary_stream), deserializer, serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        _unary(method, handler.unary_unary), deserializer, serializer
    )
