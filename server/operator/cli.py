"""`fedretrieve query`: the operator asks the whole camera network through the broker.

Arguments are validated here, before any network, with messages that say what to type;
broker refusals leave as FedRetrieveError subclasses, which `sims.cli.main` prints as one
line, never as a traceback. Heavy imports (grpc stubs, PIL) happen inside the handler.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from common.errors import ConfigError, InvalidQuery

DEFAULT_BROKER = "127.0.0.1:50070"
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def register(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser(
        "query",
        help="ask the whole camera network a question through the broker",
        description="Search every node through the broker; prints the ranked hits and coverage.",
    )
    q.add_argument("text", help='the description, e.g. "a woman in a red jacket and black cap"')
    q.add_argument(
        "--broker",
        default=os.environ.get("FEDRETRIEVE_BROKER", DEFAULT_BROKER),
        help="broker host:port (env FEDRETRIEVE_BROKER; default %(default)s)",
    )
    q.add_argument("-k", type=int, default=20, help="hits to return (default %(default)s)")
    q.add_argument("--nodes", action="append", default=[], help="only these node ids (comma list)")
    q.add_argument("--cameras", action="append", default=[], help="only these camera ids")
    q.add_argument("--since", help="ISO time (2024-05-01T08:00, local if no zone), epoch ms, or 2h")
    q.add_argument("--until", help="same forms as --since; `2h` means two hours ago")
    q.add_argument("--deadline-ms", type=int, default=0, help="query deadline (0: broker's)")
    q.add_argument("--require-full-coverage", action="store_true", help="fail if a node is missing")
    q.add_argument("--token", help="operator token (env FEDRETRIEVE_TOKEN; prefer --token-file)")
    q.add_argument("--token-file", help="file holding the operator token")
    q.add_argument("--tls-ca", help="CA that signed the broker's certificate (enables TLS)")
    q.add_argument("--tls-cert", help="client certificate for mTLS")
    q.add_argument("--tls-key", help="client key for mTLS")
    q.add_argument("--json", action="store_true", help="print the full response as JSON")
    q.add_argument("--csv", metavar="OUT", help="write the results file (image names + scores)")
    q.add_argument(
        "--sheet", metavar="OUT.png", help="write a contact sheet of the hits' thumbnails"
    )
    q.add_argument("--connect-timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    q.set_defaults(func=run_query)


def parse_time(value: str | None, *, flag: str, now: datetime | None = None) -> int:
    """Epoch milliseconds from an ISO time, epoch ms, or `<n><s|m|h|d|w>` ago; 0 for None."""
    if value is None:
        return 0
    text = value.strip()
    now = now or datetime.now(timezone.utc)
    if text.isdigit():
        return int(text)
    match = _RELATIVE.match(text)
    if match:
        ago = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
        return int((now - ago).timestamp() * 1000)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise InvalidQuery(
            f"{flag} {value!r} is not a time: use ISO 8601 (2024-05-01T08:30), epoch ms, "
            "or an age such as 30m, 2h, 3d"
        ) from err
    if when.tzinfo is None:
        when = when.astimezone()  # naive means the operator's local time
    return int(when.timestamp() * 1000)


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def build_request(args: argparse.Namespace):
    """Validate the operator's arguments locally (clear messages before any network)."""
    from protos import broker_pb2, retrieval_pb2

    text = args.text.strip()
    if not text:
        raise InvalidQuery("the query text is empty: describe the person to look for")
    if args.k <= 0:
        raise InvalidQuery(f"-k must be positive, got {args.k}")
    if args.deadline_ms < 0:
        raise InvalidQuery(f"--deadline-ms must be >= 0, got {args.deadline_ms}")
    since = parse_time(args.since, flag="--since")
    until = parse_time(args.until, flag="--until")
    if since and until and since > until:
        raise InvalidQuery(f"bad time range: --since {args.since} is after --until {args.until}")
    filters = retrieval_pb2.Filters(
        camera_ids=_split(args.cameras),
        time_range=retrieval_pb2.TimeRange(since_ms=since, until_ms=until),
    )
    return broker_pb2.BrokerSearchRequest(
        text=text,
        k=args.k,
        deadline_ms=args.deadline_ms,
        node_ids=_split(args.nodes),
        filters=filters,
        require_full_coverage=args.require_full_coverage,
    )


def check_output(value: str, flag: str, *, create_parent: bool) -> None:
    """Refuse an output path that cannot be written, before any query is sent.

    A directory is not a file name; a missing parent folder is created only where
    `create_parent` (--csv keeps doing so); --sheet never creates folders, so a mistyped
    path is reported instead of leaving new directories behind.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {value}: is a directory; give a file name inside it")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag} {value}: {parent} is not a directory")
    if not parent.exists():
        if create_parent:
            return
        raise ConfigError(f"{flag} {value}: directory {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {value}: directory {parent} is not writable")


def _write(flag: str, value: str, write) -> object:
    """Run `write()`, turning a failure to write `value` into one line naming the flag."""
    try:
        return write()
    except OSError as err:
        raise ConfigError(f"{flag} {value}: cannot write it ({err.strerror or err})") from err


def run_query(args: argparse.Namespace) -> int:
    from common.rpc.client import read_token
    from server.operator.client import BrokerClient
    from server.operator.output import (
        print_json,
        print_table,
        safe,
        write_contact_sheet,
        write_results_csv,
    )

    request = build_request(args)
    if args.csv:
        check_output(args.csv, "--csv", create_parent=True)
    if args.sheet:
        check_output(args.sheet, "--sheet", create_parent=False)
    tls = (args.tls_ca, args.tls_cert, args.tls_key)
    with BrokerClient(
        args.broker,
        token=read_token(args.token, args.token_file, "FEDRETRIEVE_TOKEN"),
        tls=tls,
        connect_timeout=args.connect_timeout,
    ) as client:
        response = client.search(request)
        if args.json:
            print_json(response)
        else:
            print_table(response)
        # notes go to stderr so `--json` output stays machine-readable
        if args.csv:
            _write("--csv", args.csv, lambda: write_results_csv(response, request.text, args.csv))
            print(f"results file: {safe(args.csv)}", file=sys.stderr)
        if args.sheet:
            missing = _write(
                "--sheet", args.sheet, lambda: write_contact_sheet(response, client, args.sheet)
            )
            note = (
                f" ({len(missing)} thumbnails unavailable: {'; '.join(missing)})" if missing else ""
            )
            print(f"contact sheet: {safe(args.sheet)}{safe(note)}", file=sys.stderr)
    return 0
