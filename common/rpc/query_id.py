"""The one rule for query ids, on both sides: what an id may look like before it is logged.

A query id travels from the operator (`x-query-id` metadata, optional) through the broker
(which makes one when none or a bad one is given) to every node (`SearchRequest.query_id`)
and into each log line of the query. It is caller input written into logs, so it is
checked, never escaped: 1-64 of [A-Za-z0-9._-] (no spaces, quotes, newlines or escape
sequences, so it can neither forge a log line nor break a key=value or JSON field). The
length is a protocol constant, not a setting: a broker and its nodes must agree on it.
"""

from __future__ import annotations

import re

from common.errors import InvalidQuery

# fullmatch, not match with "$": "$" also matches before a trailing newline
QUERY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_QUERY_ID_CHARS = 64


def is_valid_query_id(value: str) -> bool:
    return isinstance(value, str) and QUERY_ID_RE.fullmatch(value) is not None


def check_query_id(value: str) -> str:
    """`value` when it is "" (none given) or a valid id; InvalidQuery otherwise (the
    message quotes at most a few characters of it)."""
    if value and not is_valid_query_id(value):
        shown = value[:16].encode("unicode_escape").decode("ascii")
        raise InvalidQuery(
            f"`query_id` must be 1-{MAX_QUERY_ID_CHARS} of [A-Za-z0-9._-] "
            f"(got {len(value)} characters starting {shown!r})"
        )
    return value


def query_id_for_log(value: str) -> str:
    """What a log line may carry for `value`: itself when valid, "-" when empty, and
    "invalid" otherwise (the request is then refused by `check_query_id`)."""
    if not value:
        return "-"
    return value if is_valid_query_id(value) else "invalid"
