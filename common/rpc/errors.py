"""The one mapping from exceptions to gRPC statuses, around every servicer method.

`translate_errors(process, ...)` makes the decorator both servicers put on their methods:
- a `FedRetrieveError` leaves with `common.errors.status_code_for(err)` and `str(err)` as
  details (the messages are written for the caller);
- with `map_rpc_error`, a `grpc.RpcError` raised by an outgoing call (the broker proxying
  a node) leaves with the status and details that hook returns;
- anything else is a bug: logged once with its traceback, and the caller gets INTERNAL
  with a short message naming the method and whose log to read, never the stack trace.

Hooks keep the service-specific parts with their service: `scope(request)` is a context
manager around the whole call (the node's query-id contextvar, so every log line of the
call carries it), `on_outcome(servicer, method, code, seconds)` runs after every call,
successful or not (the node's request metrics, the broker's error counter).
Every details string is capped at `MAX_DETAILS_CHARS` (messages that quote caller input
are kept short where they are made, with `common.errors.name_some`; the cap is the
backstop: details travel in gRPC metadata, whose limit turns an over-long message into
RESOURCE_EXHAUSTED instead of the status meant).
Why a decorator and not an interceptor: interceptors in grpcio cannot see the servicer or
the deserialized request, which the hooks need.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import grpc

from common.errors import FedRetrieveError, status_code_for

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
OnOutcome = Callable[[Any, str, grpc.StatusCode, float], None]
MapRpcError = Callable[[grpc.RpcError, Any], tuple[grpc.StatusCode, str]]
Scope = Callable[[Any], AbstractContextManager]

MAX_DETAILS_CHARS = 400


def bounded_details(details: str) -> str:
    """`details` on one line and at most MAX_DETAILS_CHARS characters."""
    details = " ".join(details.splitlines())
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    keep = MAX_DETAILS_CHARS - 20
    return f"{details[:keep]}… (+{len(details) - keep:,} chars)"


def translate_errors(
    process: str,
    *,
    on_outcome: OnOutcome | None = None,
    map_rpc_error: MapRpcError | None = None,
    scope: Scope | None = None,
) -> Callable[[F], F]:
    """A decorator for unary-response servicer methods `(self, request, context)`.

    `process` ("node", "broker") is named in the INTERNAL message so the caller knows whose
    log has the traceback.
    """

    def decorate(method: F) -> F:
        if inspect.isgeneratorfunction(method):
            raise TypeError(f"{method.__name__}: translate_errors wraps unary responses only")
        name = method.__name__

        def status_for(err: Exception, request: Any) -> tuple[grpc.StatusCode, str]:
            if isinstance(err, FedRetrieveError):
                code, details = status_code_for(err), str(err)
            elif map_rpc_error is not None and isinstance(err, grpc.RpcError):
                code, details = map_rpc_error(err, request)
            else:
                log.exception("%s: unexpected error in %s", process, name)
                return (
                    grpc.StatusCode.INTERNAL,
                    f"internal {process} error in {name}; see the {process}'s log for details",
                )
            details = bounded_details(details)
            log.info("%s refused (%s): %s", name, code.name, details)
            return code, details

        @functools.wraps(method)
        def wrapper(servicer: Any, request: Any, context: grpc.ServicerContext) -> Any:
            code = grpc.StatusCode.OK
            t0 = time.perf_counter()
            with scope(request) if scope is not None else contextlib.nullcontext():
                try:
                    return method(servicer, request, context)
                except Exception as err:
                    code, details = status_for(err, request)
                    context.abort(code, details)
                finally:
                    if on_outcome is not None:
                        on_outcome(servicer, name, code, time.perf_counter() - t0)

        return wrapper  # type: ignore[return-value]

    return decorate
