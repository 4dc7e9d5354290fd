"""`fedretrieve ingest --node HOST:PORT --camera CAM DIR`: send a folder of crops to a node.

The images go through `NodeService.Ingest` in batches (by count and by bytes, well under
the node's receive limit), with the node's token and TLS settings; a progress bar on a
terminal only; then a summary of accepted and rejected images with the node's reason for
each rejection. Mistakes (no such folder, unreachable node, refused token) are one line
(exit 2); some images rejected is exit 1; all accepted exit 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ConfigError, FedRetrieveError, NotAuthorized, Unavailable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MAX_BATCH_BYTES = 16 << 20  # the node's default receive limit is 64 MB
SHOWN_REJECTIONS = 50
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="send a folder of person crops to a node's gallery",
        description="Ingest every image in DIR into a node (NodeService.Ingest), in batches.",
    )
    p.add_argument("dir", type=Path, help="folder of images (jpg, png, bmp, webp, gif, tif)")
    p.add_argument("--node", required=True, help="the node's host:port")
    p.add_argument("--camera", required=True, help="camera id the images come from")
    p.add_argument("-r", "--recursive", action="store_true", help="also read sub-folders")
    p.add_argument("--batch-size", type=int, default=32, help="images per call (%(default)s)")
    p.add_argument(
        "--timestamp",
        choices=("mtime", "none"),
        default="mtime",
        help="capture time of each image: the file's modification time (default) or none",
    )
    p.add_argument("--token", help="node token (env FEDRETRIEVE_NODE_TOKEN; prefer --token-file)")
    p.add_argument("--token-file", help="file holding the node's token")
    p.add_argument("--tls-ca", help="CA that signed the node's certificate (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate (mTLS)")
    p.add_argument("--tls-key", help="client key (mTLS)")
    p.add_argument("--server-name", help="name to check the node's certificate against")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds (%(default)s)")
    p.set_defaults(func=run_ingest)


def _safe(text: object) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


@dataclass
class Summary:
    accepted: int = 0
    duplicates: int = 0  # accepted earlier: the node keeps one copy of identical bytes
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    skipped: int = 0  # files that are not images

    @property
    def total(self) -> int:
        return self.accepted + self.duplicates + len(self.rejected)


def find_images(folder: Path, recursive: bool) -> tuple[list[Path], int]:
    """The image files under `folder`, sorted; and how many other files were passed over."""
    if not folder.exists():
        raise ConfigError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (give the folder that holds the images)")
    walker = folder.rglob("*") if recursive else folder.iterdir()
    images, skipped = [], 0
    for path in walker:
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif not path.name.startswith("."):
            skipped += 1
    return sorted(images), skipped


def batches(paths: list[Path], size: int, max_bytes: int = MAX_BATCH_BYTES):
    """Lists of (path, size) of at most `size` files and about `max_bytes` bytes."""
    batch, total = [], 0
    for path in paths:
        try:
            n = path.stat().st_size
        except OSError:
            n = 0
        if batch and (len(batch) >= size or total + n > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(path)
        total += n
    if batch:
        yield batch


def _channel(args: argparse.Namespace):
    from common.rpc.client import open_channel

    return open_channel(
        args.node,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        server_name=args.server_name,
        options=[("grpc.max_send_message_length", 64 << 20)],
    )


def _explain(err, node: str, done: int, total: int) -> FedRetrieveError:
    import grpc

    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = _safe((err.details() if isinstance(err, grpc.Call) else str(err)) or code.name)
    where = f" (stopped after {done} of {total} images)" if done else ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return NotAuthorized(
            f"the node at {node} refused the token (give it with --token-file or "
            f"FEDRETRIEVE_NODE_TOKEN): {details}{where}"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return FedRetrieveError(
            f"the node at {node} refused a batch as too large; lower --batch-size: {details}{where}"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"the node at {node} did not answer ({code.name}: {details}){where}")
    return FedRetrieveError(
        f"the node at {node} refused the ingest ({code.name}: {details}){where}"
    )


def ingest_folder(args: argparse.Namespace, out=None) -> Summary:
    import grpc
    from tqdm import tqdm

    from protos import node_pb2, node_pb2_grpc

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.camera.strip():
        raise ConfigError("--camera is empty: name the camera the images come from")
    paths, skipped = find_images(args.dir, args.recursive)
    summary = Summary(skipped=skipped)
    if not paths:
        return summary
    from common.rpc.client import read_token

    token = read_token(args.token, args.token_file, "FEDRETRIEVE_NODE_TOKEN")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    channel = _channel(args)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
        except grpc.FutureTimeoutError as err:
            raise Unavailable(
                f"cannot reach the node at {args.node} within {args.connect_timeout:g} s "
                "(is `fedretrieve node serve` running there, and is the port right?)"
            ) from err
        stub = node_pb2_grpc.NodeServiceStub(channel)
        bar = tqdm(
            total=len(paths),
            unit="img",
            desc="ingest",
            disable=not sys.stderr.isatty(),
            file=sys.stderr,
        )
        with bar:
            for batch in batches(paths, args.batch_size):
                items, names = [], []
                for path in batch:
                    # nodes refuse "/" in file names: a sub-folder's becomes a prefix
                    name = "_".join(path.relative_to(args.dir).parts)
                    try:
                        data = path.read_bytes()
                    except OSError as err:
                        summary.rejected.append((name, f"cannot read the file: {err.strerror}"))
                        continue
                    stamp = int(path.stat().st_mtime * 1000) if args.timestamp == "mtime" else 0
                    items.append(
                        node_pb2.ImageItem(
                            data=data, camera_id=args.camera, timestamp_ms=stamp, file_name=name
                        )
                    )
                    names.append(name)
                if items:
                    try:
                        reply = stub.Ingest(
                            node_pb2.IngestRequest(images=items), metadata=metadata, timeout=300
                        )
                    except grpc.RpcError as err:
                        raise _explain(err, args.node, summary.total, len(paths)) from None
                    for name, result in zip(names, reply.results, strict=False):
                        if result.accepted and result.reason == "duplicate":
                            summary.duplicates += 1
                        elif result.accepted:
                            summary.accepted += 1
                        else:
                            summary.rejected.append((name, result.reason or "no reason given"))
                bar.update(len(batch))
    finally:
        channel.close()
    return summary


def print_summary(args: argparse.Namespace, summary: Summary, out=None) -> None:
    out = out or sys.stdout
    head = (
        f"node {args.node}, camera {_safe(args.camera)}: {summary.accepted} accepted, "
        f"{len(summary.rejected)} rejected"
    )
    if summary.duplicates:
        head += f", {summary.duplicates} already in the gallery"
    if summary.skipped:
        head += f"; {summary.skipped} files that are not images left out"
    if not summary.total:
        head += f" (no images in {_safe(args.dir)})"
    print(head, file=out)
    for name, reason in summary.rejected[:SHOWN_REJECTIONS]:
        print(f"  rejected {_safe(name)}: {_safe(reason)}", file=out)
    if len(summary.rejected) > SHOWN_REJECTIONS:
        print(f"  ... and {len(summary.rejected) - SHOWN_REJECTIONS} more rejected", file=out)


def run_ingest(args: argparse.Namespace) -> int:
    summary = ingest_folder(args)
    print_summary(args, summary)
    return 1 if summary.rejected else 0
