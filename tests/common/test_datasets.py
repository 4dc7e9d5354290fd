"""Readers for every supported annotation format, on small files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from common.datasets import detect_format, load_records, read_dataset
from common.errors import DatasetError


def img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (120, 10, 10)).save(path)


def test_synthetic_layout(tiny_dataset: Path) -> None:
    recs = load_records(tiny_dataset)
    assert len(recs) == 36 and all(len(r.captions) == 2 for r in recs)
    assert {r.split for r in recs} == {"train", "test"}
    assert all(r.image_path.is_file() and r.camera_id.startswith("c") for r in recs)
    assert {r.node for r in recs} == {"node0", "node1"}
    assert len(load_records(tiny_dataset, split="test")) == 12


def test_cuhk_pedes_with_images_under_imgs(tmp_path: Path) -> None:
    img(tmp_path / "imgs" / "CUHK01" / "0001.png")
    img(tmp_path / "imgs" / "CUHK01" / "0002.png")
    data = [
        {
            "split": "train",
            "captions": ["A man in red."],
            "file_path": "CUHK01/0001.png",
            "processed_tokens": [["a", "man"]],
            "id": 1,
        },
        {
            "split": "test",
            "captions": ["A woman.", "She walks."],
            "file_path": "CUHK01/0002.png",
            "id": 2,
        },
    ]
    (tmp_path / "reid_raw.json").write_text(json.dumps(data))
    assert detect_format(tmp_path)[0] == "cuhk"
    recs = load_records(tmp_path)
    assert [r.person_id for r in recs] == [1, 2]
    assert recs[1].captions == ("A woman.", "She walks.")
    assert recs[0].image_path == tmp_path / "imgs" / "CUHK01" / "0001.png"


def test_icfg_missing_image_names_the_entry(tmp_path: Path) -> None:
    img(tmp_path / "imgs" / "test" / "a.jpg")
    data = [
        {"split": "test", "captions": ["x"], "file_path": "test/a.jpg", "id": 3},
        {"split": "test", "captions": ["y"], "file_path": "test/missing.jpg", "id": 4},
    ]
    (tmp_path / "ICFG-PEDES.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"ICFG-PEDES.json entry 1: image not found"):
        load_records(tmp_path)
    result = read_dataset(tmp_path, skip_bad=True)
    assert len(result.records) == 1 and len(result.skipped) == 1


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "reid_raw.json").write_text('[{"id": 1,\n "captions": ]')
    with pytest.raises(DatasetError, match=r"reid_raw.json:2: invalid JSON"):
        load_records(tmp_path)


def test_rstpreid_camera_from_file_name(tmp_path: Path) -> None:
    img(tmp_path / "imgs" / "3901_c14_0007.jpg")
    img(tmp_path / "imgs" / "3902_c3_0001.jpg")
    data = [
        {"id": 3901, "img_path": "3901_c14_0007.jpg", "captions": ["a", "b"], "split": "train"},
        {"id": 3902, "img_path": "3902_c3_0001.jpg", "captions": ["c"], "split": "val"},
        {"id": "x", "img_path": 5, "captions": "bad", "split": "train"},
    ]
    (tmp_path / "data_captions.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="entry 2"):
        load_records(tmp_path)
    recs = read_dataset(tmp_path, skip_bad=True).records
    assert [r.camera_id for r in recs] == ["c14", "c03"]
    assert recs[1].split == "val"


def test_flickr30k_tolerates_the_known_malformed_row(tmp_path: Path) -> None:
    for name in ("1000092795.jpg", "2199200615.jpg"):
        img(tmp_path / "flickr30k_images" / name)
    (tmp_path / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "2199200615.jpg| 4   A dog runs across the grass .\n"  # the known malformed row
        "this line is garbage\n"
    )
    with pytest.raises(DatasetError, match=r"results.csv:5: malformed row"):
        load_records(tmp_path)
    recs = read_dataset(tmp_path, skip_bad=True).records
    assert len(recs) == 2 and len(recs[0].captions) == 2
    assert recs[1].captions == ("A dog runs across the grass .",)
    assert recs[0].person_id != recs[1].person_id


def test_plain_csv_groups_captions_and_reports_bad_rows(tmp_path: Path) -> None:
    img(tmp_path / "a.jpg")
    img(tmp_path / "b.jpg")
    (tmp_path / "gallery.csv").write_text(
        "image,caption,person_id,camera_id,split\n"
        "a.jpg,a man in red,7,cam1,test\n"
        "a.jpg,red jacket man,7,cam1,test\n"
        "b.jpg,a woman,8,cam2,train\n"
        ",no image,9,cam2,train\n"
    )
    with pytest.raises(DatasetError, match=r"gallery.csv:5: malformed row"):
        load_records(tmp_path)
    recs = read_dataset(tmp_path, skip_bad=True).records
    assert recs[0].captions == ("a man in red", "red jacket man")
    assert (recs[0].person_id, recs[0].camera_id, recs[0].split) == (7, "cam1", "test")
    (tmp_path / "gallery.csv").write_text("img,text\na.jpg,x\n")
    with pytest.raises(DatasetError, match="header must contain"):
        load_records(tmp_path)


def test_missing_dataset_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_records(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no known annotation file"):
        load_records(tmp_path)
