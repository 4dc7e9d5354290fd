"""What `fedretrieve query` shows and writes: table, coverage line, JSON, results CSV, sheet."""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TextIO

from google.protobuf import json_format

from common.errors import FedRetrieveError
from protos import broker_pb2

# The seed paper's results file (as `fedretrieve eval --results` writes it), plus where
# each image lives: the first five columns match the offline results file.
CSV_COLUMNS = (
    "query_index",
    "query",
    "rank",
    "image",
    "score",
    "node_id",
    "camera_id",
    "timestamp_ms",
    "image_id",
    "merge",
)
TILE = 128  # contact-sheet thumbnail box, pixels
COLUMNS = 5

# C0 controls (ESC starts every terminal escape sequence), DEL, C1 controls (CSI 0x9b is a
# one-byte escape on some terminals), bidirectional overrides and isolates (which reorder
# what the operator reads) and the Unicode line/paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def safe(text: object) -> str:
    """`text` fit for the operator's terminal: every control character and bidi override
    shown as a visible escape (`\\x1b`, `\\u202e`) instead of acting on the terminal.

    Everything printed that a node chose (file names, camera ids, node ids, error details)
    goes through here: a file name must not be able to move the cursor, recolour or retitle
    the terminal, or forge a line of the table.
    """

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE.sub(escape, str(text))


def format_time(timestamp_ms: int) -> str:
    if not timestamp_ms:
        return "-"
    return datetime.fromtimestamp(timestamp_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def coverage_line(response: broker_pb2.BrokerSearchResponse) -> str:
    """`coverage: 3/4 nodes answered; node-d timed_out (DEADLINE_EXCEEDED); ...`."""
    cov = response.coverage
    parts = [f"coverage: {cov.nodes_answered}/{cov.nodes_total} nodes answered"]
    if cov.nodes_skipped:
        skipped = ", ".join(o.node_id for o in cov.nodes if o.state == "skipped")
        parts.append(f"{cov.nodes_skipped} skipped (none of the cameras asked for: {skipped})")
    for o in cov.nodes:
        if o.state not in ("ok", "skipped"):
            parts.append(
                f"{o.node_id} {o.state} ({o.grpc_status}{': ' + o.message if o.message else ''})"
            )
    for o in cov.nodes:
        if o.HasField("student"):
            parts.append(student_text(o))
    parts.append(f"{cov.vectors_searched}/{cov.vectors_total} vectors searched")
    if response.merge == "rrf":
        parts.append("merge=rrf: nodes on different model versions, scores are rank-fusion scores")
    else:
        parts.append(f"merge={response.merge}")
    if cov.degraded:
        parts.append("degraded: " + ",".join(cov.degraded))
    parts.append(f"{response.took_ms:.0f} ms")
    parts.append(f"query {response.query_id}")
    return safe("; ".join(parts))  # node ids, states and messages come from the nodes


def student_text(outcome: broker_pb2.NodeOutcome) -> str:
    """`node-s answered with student m@2 of teacher t@1 (verified: agreement 0.98 >= 0.9)`."""
    check = outcome.student
    return (
        f"{outcome.node_id} answered with student {outcome.model_version} of teacher "
        f"{check.teacher_version} ({check.note})"
    )


def print_table(response: broker_pb2.BrokerSearchResponse, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    rows = [("rank", "score", "node", "camera", "time", "image id", "file")]
    for rank, hit in enumerate(response.hits, 1):
        rows.append(
            (
                str(rank),
                f"{hit.score:.4f}",
                hit.node_id,
                hit.camera_id or "-",
                format_time(hit.timestamp_ms),
                str(hit.image_id),
                hit.file_name or "-",
            )
        )
    rows = [tuple(safe(cell) for cell in row) for row in rows]  # names come from the nodes
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 1, 5}
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)
    if not response.hits:
        print("(no hits)", file=out)
    print(coverage_line(response), file=out)


def print_json(response: broker_pb2.BrokerSearchResponse, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    print(
        json_format.MessageToJson(response, always_print_fields_with_no_presence=True, indent=2),
        file=out,
    )


def write_results_csv(
    response: broker_pb2.BrokerSearchResponse, query: str, path: str | Path
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for rank, hit in enumerate(response.hits, 1):
            writer.writerow(
                [
                    0,
                    query,
                    rank,
                    hit.file_name or f"{hit.node_id}/{hit.image_id}",
                    f"{hit.score:.6f}",
                    hit.node_id,
                    hit.camera_id,
                    hit.timestamp_ms,
                    hit.image_id,
                    response.merge,
                ]
            )


def write_contact_sheet(
    response: broker_pb2.BrokerSearchResponse,
    client,
    path: str | Path,
    *,
    title: str = "",
    correct: Sequence[bool] | None = None,
) -> list[str]:
    """Fetch each hit's thumbnail through the broker and tile them with captions.

    `title` (the query) is written above the tiles; `correct`, where ground truth is known
    (the simulation), frames each hit green or red so a reader sees at a glance what the
    model got right. Returns the hits whose thumbnail could not be fetched (drawn as a grey
    tile saying why), so the caller can report them; the sheet is written either way.
    """
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    hits: Sequence = response.hits
    if not hits:
        raise FedRetrieveError("no hits to draw: the contact sheet would be empty")
    if correct is not None and len(correct) != len(hits):
        raise ValueError(f"`correct` has {len(correct)} entries for {len(hits)} hits")
    font = ImageFont.load_default()
    line_h = 12
    text_h = 3 * line_h + 4
    cols = min(COLUMNS, len(hits))
    rows = (len(hits) + cols - 1) // cols
    width = cols * (TILE + 8) + 8
    header = textwrap.wrap(title, max(20, width // 7)) if title else []
    top = 8 + len(header) * line_h + (4 if header else 0)
    sheet = Image.new("RGB", (width, top + rows * (TILE + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, line in enumerate(header):
        draw.text((8, 8 + j * line_h), line, fill="black", font=font)
    missing = []
    for i, hit in enumerate(hits):
        x = 8 + (i % cols) * (TILE + 8)
        y = top + (i // cols) * (TILE + text_h + 8)
        try:
            thumb = client.thumbnail(hit.node_id, hit.image_id, max_side=TILE)
            img = Image.open(io.BytesIO(thumb.jpeg)).convert("RGB")
            img.thumbnail((TILE, TILE))
            sheet.paste(img, (x + (TILE - img.width) // 2, y + (TILE - img.height) // 2))
        except (FedRetrieveError, OSError) as err:
            missing.append(f"{hit.node_id}/{hit.image_id}: {err}")
            draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=(200, 200, 200))
            draw.text((x + 4, y + TILE // 2 - 6), "unavailable", fill="black", font=font)
        if correct is not None:
            colour = (0, 150, 0) if correct[i] else (200, 0, 0)
            draw.rectangle([x - 3, y - 3, x + TILE + 2, y + TILE + 2], outline=colour, width=3)
        label = [f"#{i + 1}  {hit.score:.4f}", hit.node_id[:20], (hit.camera_id or "-")[:20]]
        for j, line in enumerate(label):
            draw.text((x, y + TILE + 2 + j * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return missing
