"""The whole pipeline in miniature: synth data, pretrain, Flower simulation, baselines,
real node daemons + broker on loopback, report with every key of the contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sims.simulation.pipeline import SimConfig, load_sim_config, run_sim

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mini_report(tmp_path_factory) -> tuple[dict, Path]:
    base = load_sim_config(Path("sims/configs/mini.toml"))
    cfg = SimConfig(
        **{
            **base.__dict__,
            "federated": base.federated.__class__(
                **{**base.federated.__dict__, "strategies": ("ffa",), "seeds": (1,)}
            ),
        }
    )
    out = tmp_path_factory.mktemp("sim")
    report = run_sim(cfg, out / "run", out / "cache", progress=False)
    return report, out / "run"


def test_report_has_every_contract_key_with_sane_values(mini_report) -> None:
    report, out = mini_report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["methods"] == report["methods"]
    methods = ("zero_shot", "zero_shot_camera_norm", "zero_shot_colour_match")
    for method in (*methods, "local_only", "federated", "centralized"):
        m = on_disk["methods"][method]
        assert set(m) == {"R1", "R5", "R10", "mAP", "mINP"}
        assert all(0.0 <= v <= 100.0 and math.isfinite(v) for v in m.values())
        assert m["R1"] <= m["R5"] <= m["R10"]
    assert [r["round"] for r in on_disk["rounds"]] == [1]
    att, methods = on_disk["attributable"], on_disk["methods"]
    assert att["baseline"] in ("zero_shot_camera_norm", "local_only_best")
    best = max(methods["zero_shot_camera_norm"]["R1"], methods["local_only_best"]["R1"])
    assert att["R1"] == pytest.approx(methods["federated"]["R1"] - best, abs=0.011)
    md = (out / "report.md").read_text()
    assert "Attributable to federated learning" in md
    beside = methods["federated"]["R1"] - methods["zero_shot_colour_match"]["R1"]
    assert f"federated {beside:+.2f} Rank-1" in md
    comm = on_disk["communication"]
    assert comm["image_bytes_sent"] == 0
    assert 0 < comm["adapter_bytes_per_node_per_round"] < comm["full_model_bytes"] / 100
    broker = on_disk["broker"]
    assert broker["queries"] > 0 and broker["coverage"] == 1.0
    assert 0 < broker["p50_ms"] <= broker["p99_ms"]
    assert on_disk["timing"]["total_s"] > 0 and on_disk["timing"]["per_round_s"] > 0
    for name in ("report.md", "rounds.png", "bytes.png", "latency.png", "contact_sheet.png"):
        assert (out / name).stat().st_size > 0


def test_more_fl_seeds_report_their_spread_beside_the_served_run(mini_report) -> None:
    report, out = mini_report
    seeds = json.loads((out / "report.json").read_text())["seeds"]
    assert seeds["seeds"] == [0, 1] and seeds["served"] == 0
    assert seeds["R1"][0] == report["methods"]["federated"]["R1"]  # seed 0 is the served run
    assert seeds["R1_mean"] == pytest.approx(sum(seeds["R1"]) / 2, abs=0.006)
    assert seeds["R1_sd"] == pytest.approx(abs(seeds["R1"][0] - seeds["R1"][1]) / 2**0.5, abs=0.006)
    best = report["attributable"]["baseline"]
    expected = seeds["mAP_mean"] - report["methods"][best]["mAP"]
    assert seeds["mAP_attributable_mean"] == pytest.approx(expected, abs=0.011)
    assert (out / "fl-ffa-seed1" / "final" / "adapter_model.safetensors").is_file()
    assert "Over FL seeds [0, 1]" in (out / "report.md").read_text()
    assert "federated_ffa_seed1" in report["timing"]["stages_s"]


def test_fl_seeds_that_repeat_or_clash_are_refused() -> None:
    from common.errors import ConfigError
    from sims.simulation.pipeline import FederatedSection, SimConfig

    with pytest.raises(ConfigError, match="repeats a seed"):
        FederatedSection(seeds=(1, 1))
    with pytest.raises(ConfigError, match="set one of them"):
        FederatedSection(seeds=(1,), options={"seed": 3})
    with pytest.raises(ConfigError, match="own seed"):
        SimConfig(seed=1, federated=FederatedSection(seeds=(1, 2)))


def test_broker_answers_equal_offline_metrics(mini_report) -> None:
    broker = mini_report[0]["broker"]
    assert broker["matches_offline"] is True
    assert broker["metrics"] == broker["offline"]
    assert broker["top10_agreement"] == 1.0
    assert broker["merge"] == {"score": broker["queries"]}  # one model version everywhere
    # the mini config normalises per camera: every node served normalised crops, and the
    # broker's answers equal the offline ranking of the same normalised gallery
    assert mini_report[0]["setup"]["config"]["camera_norm"] is True
    versions = broker["camera_norm"].values()
    assert versions and all(v.startswith("cn-") for v in versions)


def test_federated_result_is_the_final_round(mini_report) -> None:
    report = mini_report[0]
    last = report["rounds"][-1]
    assert all(report["methods"]["federated"][k] == last[k] for k in ("R1", "mAP"))


GREEN, RED, WHITE = (0, 150, 0), (200, 0, 0), (255, 255, 255)  # server.operator.output


def tile_frames(sheet) -> list:
    """The frame colour around each tile slot of a contact sheet, in reading order.

    Rows are found by their frames (the header above them varies with the title); each slot
    is sampled on its left, top and right edge: one colour where all three agree (WHITE: no
    frame), else the three samples, so a half-drawn frame fails a comparison.
    """
    from server.operator.output import COLUMNS, TILE

    px = sheet.load()
    rows, y = [], 0
    while y < sheet.height:  # the 3-px frame runs down columns 5..7 left of the first tile
        if px[6, y] in (GREEN, RED):
            rows.append(y + 3)  # the tile starts below the frame's top edge
            y += TILE + 6
        else:
            y += 1
    frames = []
    for top in rows:
        for col in range(COLUMNS):
            x = 8 + col * (TILE + 8)
            if x + TILE + 3 > sheet.width:
                break
            mid = TILE // 2
            left, upper = px[x - 2, top + mid], px[x + mid, top - 2]
            right = px[x + TILE + 1, top + mid]
            frames.append(left if left == upper == right else (left, upper, right))
    return frames


class _Thumbnails:
    """A stand-in broker client: a grey crop per hit, or the error a node would give."""

    def __init__(self, missing: set[int]) -> None:
        self.missing = missing

    def thumbnail(self, node_id: str, image_id: int, max_side: int = 0):
        import io

        from PIL import Image

        from common.errors import FedRetrieveError
        from protos import retrieval_pb2

        if image_id in self.missing:
            raise FedRetrieveError(f"no image {image_id} on {node_id}")
        buf = io.BytesIO()
        Image.new("RGB", (32, 64), (120, 120, 120)).save(buf, format="JPEG")
        return retrieval_pb2.ThumbnailResponse(jpeg=buf.getvalue(), width=32, height=64)


def test_contact_sheet_frames_each_hit_green_if_correct_red_if_wrong(tmp_path) -> None:
    """The ground truth is known here: every frame is checked at its hit's position."""
    from PIL import Image

    from protos import broker_pb2, retrieval_pb2
    from server.operator.output import write_contact_sheet

    correct = [True, False, False, True, True, False, True]  # two rows of five slots
    response = broker_pb2.BrokerSearchResponse(
        hits=[
            retrieval_pb2.Hit(node_id="n", image_id=i + 1, score=1 - i / 10)
            for i in range(len(correct))
        ]
    )
    client = _Thumbnails(missing={4})  # an unavailable thumbnail is framed all the same
    titled = "a person in a long red coat with a black backpack and white shoes " * 3
    for title in ("", titled):
        path = tmp_path / f"sheet{len(title)}.png"
        missing = write_contact_sheet(response, client, path, title=title, correct=correct)
        assert len(missing) == 1 and missing[0].startswith("n/4:")
        frames = tile_frames(Image.open(path).convert("RGB"))
        assert frames == [GREEN if ok else RED for ok in correct] + [WHITE] * 3, title
    write_contact_sheet(response, client, tmp_path / "plain.png")  # no ground truth: no frames
    assert tile_frames(Image.open(tmp_path / "plain.png").convert("RGB")) == []
    with pytest.raises(ValueError, match="7 hits"):
        write_contact_sheet(response, client, tmp_path / "x.png", correct=correct[:-1])


def test_contact_sheet_marks_hits_against_ground_truth(mini_report) -> None:
    """Each sheet query is titled and every hit framed green (the person described) or red."""
    from PIL import Image

    from server.operator.output import COLUMNS

    report, out = mini_report
    serving = report["setup"]["config"]["serving"]
    sheets = sorted((out / "serve").glob("sheet-*.png"))
    assert len(sheets) == serving["sheet_queries"] == 2
    k = serving["sheet_k"]
    slots, hits = [], []
    for path in sheets:
        frames = tile_frames(Image.open(path).convert("RGB"))
        assert all(f in (GREEN, RED) for f in frames[:k]), (path.name, frames)
        assert frames[k:] == [WHITE] * (-k % COLUMNS), (path.name, frames)  # empty: unframed
        slots += frames
        hits += frames[:k]
    # the report's sheet is the per-query sheets stacked, frames and all
    assert tile_frames(Image.open(out / "contact_sheet.png").convert("RGB")) == slots
    # 8 hits per query, and no person has 8 test crops in the mini gallery: some are wrong
    assert RED in hits
