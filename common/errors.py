"""Domain exceptions and the one table that maps them to gRPC status codes.

Every message names the offending value and, where there is one, the way out. Services
translate these to `grpc.StatusCode` through `STATUS_CODES`; anything else is a bug and
leaves as INTERNAL without its stack trace (`common.rpc.errors.translate_errors`, used by
both services).
"""

from __future__ import annotations

import grpc


class FedRetrieveError(Exception):
    """Base of every error an operator or a node is meant to read."""


class ConfigError(FedRetrieveError):
    """A config file, model spec or command-line value is invalid."""


class DatasetError(FedRetrieveError):
    """An annotation file or image is missing or malformed (names file and line)."""


class InvalidQuery(FedRetrieveError):
    """A search request is malformed: empty text, bad k, wrong vector size, bad filter."""


class UnknownModel(FedRetrieveError):
    """A model spec names no config, directory or reachable hub id."""


class AdapterMismatch(FedRetrieveError):
    """An adapter's keys, shapes, dtypes, values or base model do not fit the model."""


class NotFound(FedRetrieveError):
    """A named object (image id, node id) does not exist."""


class GalleryNotReady(FedRetrieveError):
    """The node cannot answer yet (no index built, model loading)."""


class NotAuthorized(FedRetrieveError):
    """Missing or wrong credentials."""


class TextTowerAbsent(FedRetrieveError):
    """A text-only query reached a node that runs without its text tower (vector-only)."""


class Unavailable(FedRetrieveError):
    """A peer cannot be reached or did not answer in time."""


STATUS_CODES: dict[type[FedRetrieveError], grpc.StatusCode] = {
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    DatasetError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidQuery: grpc.StatusCode.INVALID_ARGUMENT,
    AdapterMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    UnknownModel: grpc.StatusCode.NOT_FOUND,
    NotFound: grpc.StatusCode.NOT_FOUND,
    GalleryNotReady: grpc.StatusCode.FAILED_PRECONDITION,
    TextTowerAbsent: grpc.StatusCode.FAILED_PRECONDITION,
    NotAuthorized: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code_for(err: BaseException) -> grpc.StatusCode:
    """The gRPC status for `err`: the nearest mapped base class, INTERNAL otherwise."""
    for cls in type(err).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


# ---------------------------------------------------------------- short messages
# Error details travel as gRPC metadata (about 8 KB in all) and land in logs: a message
# that quotes caller input must stay short and on one line, whatever the caller sent.
_TAME = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def short_repr(value: object, max_chars: int = 40) -> str:
    """`repr(value)` on one line, at most about `max_chars` characters of a long string
    kept, with how many more there were (`'aaaa…'(+9,996 chars)`)."""
    if isinstance(value, (str, bytes)) and len(value) > max_chars:
        return f"{value[:max_chars]!r}…(+{len(value) - max_chars:,} chars)"
    text = repr(value)
    return text if len(text) <= max_chars + 20 else text[: max_chars + 20] + "…"


def name_some(values: object, *, limit: int = 5, plain: bool = False) -> str:
    """The first `limit` of `values` and how many more: `['a', 'b'] (+4,998 more)`.

    Every value is `short_repr`'d, so a message naming caller input stays short and
    cannot forge a log line. `plain` leaves tame values ([A-Za-z0-9._-], up to 40 chars)
    unquoted and joins with ", " (`cam1, cam2 (+3 more)`).
    """
    items = list(values)  # type: ignore[call-overload]
    shown = items[:limit]
    if plain:
        text = ", ".join(
            v if isinstance(v, str) and 0 < len(v) <= 40 and set(v) <= _TAME else short_repr(v)
            for v in shown
        )
    else:
        text = "[" + ", ".join(short_repr(v) for v in shown) + "]"
    more = len(items) - len(shown)
    return f"{text} (+{more:,} more)" if more else text
