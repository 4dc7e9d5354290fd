"""`fedretrieve bench mining --json OUT`: how well a node's label-free stages recover the
generator's hidden tracklets and identities (issue 14).

Each node's train crops are embedded with the given model (the round's global model), then
mined as the node would (`edge_node.fl.mining`): tracklets by time + appearance, then
pseudo-identities by mutual top-1 across cameras. Quality is pairwise precision/recall
against the truth the synthetic benchmark keeps in its annotations (`tracklet`, `id`),
beside the trivial alternatives: linking by time alone, and every tracklet its own person.
`pooled` mines all nodes' crops together: what exchanging memories across nodes could add,
plain and with 004's triangle relation (`--triangles`). `shared` mines each node's crops as
`share-memories` does: with every other node's tracklet memories taking part in the links
(and the window, when one is set), and says how many of them joined a local pseudo-identity
and how often that was the right person.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("mining", help="label-free tracklets and pseudo-identities")
    p.add_argument("--json", dest="json_out", required=True, help="write the figures here")
    p.add_argument("--data", required=True, help="a synthetic benchmark (fedretrieve synth)")
    p.add_argument("--model", default="default", help="model spec (e.g. the base model dir)")
    p.add_argument("--adapter", type=Path, help="adapter to merge in (the round's global model)")
    p.add_argument("--split", default="train")
    p.add_argument("--max-gap-ms", type=int, default=2_000)
    p.add_argument("--min-cos", type=float, default=0.0)
    p.add_argument("--link-cos", type=float, default=0.7)
    p.add_argument("--shared-cos", type=float, default=0.7, help="links to shared memories")
    p.add_argument("--triangles", type=int, default=2, help="pooled: 004's triangle relation")
    p.add_argument(
        "--link-window-s",
        type=float,
        default=0.0,
        help="also mine with this space-time window across cameras (0: not)",
    )
    p.add_argument(
        "--camera-norm",
        action="store_true",
        help="normalise each node's crops per camera (from its own crops), as nodes train",
    )
    p.set_defaults(func=main)


def hidden_truth(data: str | Path) -> dict[str, tuple[int, int]]:
    """Image path -> (tracklet, person) from the synthetic benchmark's annotations."""
    from common.errors import DatasetError

    root = Path(data)
    ann = root / "annotations.json" if root.is_dir() else root
    entries = json.loads(ann.read_text())
    if not entries or "tracklet" not in entries[0]:
        raise DatasetError(f"{ann}: no `tracklet` ground truth (make it with fedretrieve synth)")
    return {
        str((ann.parent / e["file_path"]).resolve()): (int(e["tracklet"]), int(e["id"]))
        for e in entries
    }


def mine(records, emb: np.ndarray, truth: dict, cfg, triangles: int = 0) -> dict:
    from edge_node.fl.mining import MiningSettings, label_quality, link_tracklets, pseudo_identities

    cams = [r.camera_id for r in records]
    stamps = [r.timestamp_ms for r in records]
    true_t = [truth[str(Path(r.image_path).resolve())][0] for r in records]
    true_p = [truth[str(Path(r.image_path).resolve())][1] for r in records]
    tracklets = link_tracklets(cams, stamps, emb, cfg)
    time_only = link_tracklets(cams, stamps, emb, MiningSettings(cfg.max_gap_ms, -1.0, 1.01))
    plain = dataclasses.replace(cfg, link_window_ms=0)  # the rows before the window
    ids = pseudo_identities(tracklets, cams, emb, plain)
    out = {}
    if triangles:  # pooled memories (share-memories): 004's triangle relation on the links
        triangle = dataclasses.replace(plain, triangles=triangles)
        out["pseudo_ids_triangles"] = label_quality(
            pseudo_identities(tracklets, cams, emb, triangle), true_p
        )
    if cfg.link_window_ms:  # the space-time prior; and the same window at any similarity
        for key, link_cos in (("pseudo_ids_windowed", cfg.link_cos), ("windowed_any_cos", -1.0)):
            windowed = dataclasses.replace(cfg, link_cos=link_cos)
            out[key] = label_quality(
                pseudo_identities(tracklets, cams, emb, windowed, stamps), true_p
            )
    return {
        "crops": len(records),
        "tracklets": label_quality(tracklets, true_t),
        "tracklets_time_only": label_quality(time_only, true_t),
        "pseudo_ids": label_quality(ids, true_p),
        "pseudo_ids_tracklets_alone": label_quality(tracklets, true_p),
        **out,
    }


def shared_mining(nodes: dict[str, tuple[list, np.ndarray]], truth: dict, cfg) -> dict:
    """Per node: its pseudo-identities with every other node's memories taking part
    (`share-memories`), and the shared memories' joins scored against the truth."""
    from common.memories import pool
    from edge_node.fl.mining import export_memories, label_quality, link_tracklets, mine_identities

    exported, persons = {}, {}
    for node, (recs, emb) in nodes.items():
        cams, stamps = [r.camera_id for r in recs], [r.timestamp_ms for r in recs]
        labels = link_tracklets(cams, stamps, emb, cfg)
        true_p = np.array([truth[str(Path(r.image_path).resolve())][1] for r in recs])
        exported[node] = (labels, export_memories(labels, cams, stamps, emb))
        # each memory's person: its tracklet's majority (the truth a real site lacks)
        persons[node] = np.array(
            [np.bincount(true_p[labels == t]).argmax() for t in range(labels.max() + 1)]
        )
    out = {}
    for node, (recs, emb) in nodes.items():
        others = [(i, n) for i, n in enumerate(nodes) if n != node]
        shared = pool([(i, exported[n][1]) for i, n in others])
        shared_person = np.concatenate([persons[n] for _, n in others])
        labels = exported[node][0]
        cams, stamps = [r.camera_id for r in recs], [r.timestamp_ms for r in recs]
        true_p = np.array([truth[str(Path(r.image_path).resolve())][1] for r in recs])
        mined = mine_identities(labels, cams, emb, cfg, stamps, shared)
        joined = np.flatnonzero(mined.shared >= 0)
        right = 0
        for j in joined:  # the local pseudo-identity's majority person is the memory's
            local = true_p[mined.local == mined.shared[j]]
            right += int(np.bincount(local).argmax() == shared_person[j])
        # how many shared memories could have joined: their person visits this node
        present = np.isin(shared_person, np.unique(true_p))
        out[node] = {
            "pseudo_ids": label_quality(mined.local, true_p),
            "shared_memories": len(shared),
            "shared_of_people_here": int(present.sum()),
            "shared_joined": len(joined),
            "shared_joined_right": right,
        }
    return out


def main(args: argparse.Namespace) -> int:
    from common.camera_norm import gallery_camera_norm
    from common.datasets import load_records
    from common.evaluate import embed_records
    from common.factory import create_model
    from common.train import ImageBank, core_model
    from edge_node.fl.mining import MiningSettings

    started, load_before = time.time(), os.getloadavg()
    cfg = MiningSettings(
        args.max_gap_ms,
        args.min_cos,
        args.link_cos,
        link_window_ms=int(args.link_window_s * 1000),
        shared_cos=args.shared_cos,
    )
    truth = hidden_truth(args.data)
    model = create_model(args.model, adapter=args.adapter).eval()
    records = load_records(args.data, split=args.split)
    by_node: dict[str, list] = {}
    for r in records:
        by_node.setdefault(r.node or "-", []).append(r)
    result = {
        "command": "fedretrieve " + " ".join(sys.argv[1:]),
        "model": model.version,
        "settings": dataclasses.asdict(cfg),
        "camera_norm": args.camera_norm,
        "nodes": {},
    }
    everything, emb_all, mined_nodes = [], [], {}
    for node, recs in sorted(by_node.items()):
        # embed_records' gallery order; no captions: a site has none, and text is not needed
        recs = sorted(
            (dataclasses.replace(r, captions=()) for r in recs), key=lambda r: str(r.image_path)
        )
        bank = None
        if args.camera_norm:  # from this node's own crops, as a node trains (task.py)
            bank = ImageBank(recs, core_model(model).preprocess, gallery_camera_norm(recs))
        emb = embed_records(model, recs, bank=bank).gallery
        result["nodes"][node] = mine(recs, emb, truth, cfg)
        everything += recs
        emb_all.append(emb)
        mined_nodes[node] = (recs, emb)
        print(node, json.dumps(result["nodes"][node]), flush=True)
    result["shared"] = shared_mining(mined_nodes, truth, cfg)
    print("shared", json.dumps(result["shared"]))
    result["pooled"] = mine(everything, np.concatenate(emb_all), truth, cfg, args.triangles)
    print("pooled", json.dumps(result["pooled"]))
    result["machine"] = {
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "seconds": round(time.time() - started, 1),
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0
