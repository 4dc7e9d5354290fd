"""A contact sheet of a generated benchmark: a row per camera, crops with their captions.

It exists so a person can judge at a glance whether the crops look like people wearing
what the captions say, and how differently the cameras see them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from common.errors import DatasetError

TEXT_W = 230
PAD = 6


def make_preview(data_dir: str | Path, out_png: str | Path, per_camera: int = 3) -> Path:
    """Write `out_png`: the first `per_camera` crops of each camera (distinct people)."""
    data = Path(data_dir)
    ann = data / "annotations.json"
    if not ann.is_file():
        raise DatasetError(f"{ann} not found: run `fedretrieve synth --out {data}` first")
    records = json.loads(ann.read_text(encoding="utf-8"))
    cams_info = {}
    if (data / "cameras.json").is_file():
        cams_info = json.loads((data / "cameras.json").read_text(encoding="utf-8"))
    rows: dict[str, list[dict]] = {}
    seen: dict[str, set[int]] = {}
    for r in records:
        cam = r.get("camera", "?")
        picked = rows.setdefault(cam, [])
        ids = seen.setdefault(cam, set())
        if len(picked) < per_camera and r["id"] not in ids:
            picked.append(r)
            ids.add(r["id"])
    if not rows:
        raise DatasetError(f"{ann} holds no records")
    cams = sorted(rows, key=lambda c: (c.startswith("s"), c))
    first = Image.open(data / rows[cams[0]][0]["file_path"])
    cell_w, cell_h = first.width * 2, first.height * 2
    label_w = 120
    row_h = max(cell_h, 120) + PAD
    sheet = Image.new(
        "RGB", (label_w + per_camera * (cell_w + TEXT_W + PAD), len(cams) * row_h), "white"
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    big = ImageFont.load_default(size=14)
    for row, cam in enumerate(cams):
        y = row * row_h
        info = cams_info.get(cam, {})
        draw.text((PAD, y + PAD), cam, fill="black", font=big)
        draw.text((PAD, y + 26), str(info.get("node") or "source"), fill="black", font=font)
        draw.text((PAD, y + 42), str(info.get("look", "")), fill="black", font=font)
        for col, r in enumerate(rows[cam]):
            x = label_w + col * (cell_w + TEXT_W + PAD)
            img = Image.open(data / r["file_path"]).convert("RGB")
            sheet.paste(img.resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
            text = f"id {r['id']} ({r['split']})\n" + "\n".join(
                textwrap.fill(c, width=36) for c in r["captions"][:2]
            )
            draw.multiline_text((x + cell_w + 4, y + 2), text, fill="black", font=font, spacing=2)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
