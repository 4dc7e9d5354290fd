"""Console vs `fedretrieve query`: the same search, side by side, broker time excluded.

    .venv/bin/python tests/console/measure_console.py [--queries 40] [--k 10]

Starts two real node daemons (tiny model), a real broker and the console on loopback (the
test world of tests/console), then alternates the two paths for each query:
- `fedretrieve query TEXT --json` run in this process (`sims.cli.main`: argument checks,
  a new channel and connect, Search, JSON out), i.e. the command without interpreter start;
- the same search on a kept BrokerClient (`server.operator.client`, the command's client
  with its channel already open) printed with the command's `print_table`: the query
  path's floor, without connecting;
- the console: POST /search with a signed-in session, following the redirect to the
  results page (HTML rendered, the broker's Status read for the pickers, the audit line
  fsynced); thumbnails are not counted (the browser fetches them lazily afterwards).
From each the broker's own `took_ms` for that query is subtracted. Prints p50/p95 of both
and of the difference, and the load average. Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from console_fixtures import (
    TOKENS,
    start_broker,
    start_console,
    start_fleet,
    stop_fleet,
    write_console_config,
)

TEXTS = ["a person in a red top and black trousers", "someone in a blue shirt",
         "a man in white with a yellow bag", "person wearing green"]  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    import httpx
    import torch

    from common.factory import create_model
    from sims.cli import main as cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="console-measure-"))
    fleet = start_fleet(root / "fleet")
    broker = start_broker(fleet.nodes, create_model("tiny"))
    console = start_console(write_console_config(root / "console", broker.address))
    audit = root / "console" / "audit.jsonl"
    try:
        client = httpx.Client(base_url=console.url, follow_redirects=True, timeout=30)
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        page = client.post("/login", data={"csrf": csrf, "token": TOKENS["alice"]})
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        from protos import broker_pb2
        from server.operator.client import BrokerClient
        from server.operator.output import print_table

        warm = BrokerClient(broker.address, token=TOKENS["alice"])
        cli_ms, warm_ms, console_ms = [], [], []
        for i in range(args.queries + 4):  # the first 4 warm both paths up
            text = TEXTS[i % len(TEXTS)]
            out = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(out):
                rc = cli(["query", text, "--broker", broker.address, "--token", TOKENS["alice"],
                          "-k", str(args.k), "--json"])  # fmt: skip
            cli_total = (time.perf_counter() - start) * 1000
            assert rc == 0
            cli_broker = json.loads(out.getvalue())["tookMs"]

            start = time.perf_counter()
            response = warm.search(broker_pb2.BrokerSearchRequest(text=text, k=args.k))
            print_table(response, out=io.StringIO())
            warm_total = (time.perf_counter() - start) * 1000

            start = time.perf_counter()
            reply = client.post("/search", data={"csrf": csrf, "text": text, "k": str(args.k)})
            console_total = (time.perf_counter() - start) * 1000
            assert "/results/" in str(reply.url), reply.text[:500]
            entry = json.loads(audit.read_text().splitlines()[-1])
            assert entry["action"] == "search"
            console_broker = entry["coverage"]["broker_ms"]
            if i >= 4:
                cli_ms.append(cli_total - cli_broker)
                warm_ms.append(warm_total - response.took_ms)
                console_ms.append(console_total - console_broker)
        diff = [c - q for c, q in zip(console_ms, warm_ms, strict=True)]
        rows = [
            ("fedretrieve query (in process, connects)", cli_ms),
            ("query's client, channel kept open", warm_ms),
            ("console: POST /search + results page", console_ms),
            ("console minus kept client, per query", diff),
        ]
        print(f"{args.queries} queries each, k={args.k}, 2 nodes x 8 images, tiny model")
        print(f"{'ms beyond the broker own took_ms':42} {'p50':>7} {'p95':>7} {'mean':>7}")
        for name, values in rows:
            p50, p95, mean = pct(values, 0.5), pct(values, 0.95), statistics.mean(values)
            print(f"{name:42} {p50:7.1f} {p95:7.1f} {mean:7.1f}")
        print("load average:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    finally:
        console.stop()
        broker.stop()
        stop_fleet(fleet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
