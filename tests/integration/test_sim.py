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
                **{**base.federated.__dict__, "strategies": ("ffa",)}
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
    for method in ("zero_shot", "local_only", "federated", "centralized"):
        m = on_disk["methods"][method]
        assert set(m) == {"R1", "R5", "R10", "mAP", "mINP"}
        assert all(0.0 <= v <= 100.0 and math.isfinite(v) for v in m.values())
        assert m["R1"] <= m["R5"] <= m["R10"]
    assert [r["round"] for r in on_disk["rounds"]] == [1]
    comm = on_disk["communication"]
    assert comm["image_bytes_sent"] == 0
    assert 0 < comm["adapter_bytes_per_node_per_round"] < comm["full_model_bytes"] / 100
    broker = on_disk["broker"]
    assert broker["queries"] > 0 and broker["coverage"] == 1.0
    assert 0 < broker["p50_ms"] <= broker["p99_ms"]
    assert on_disk["timing"]["total_s"] > 0 and on_disk["timing"]["per_round_s"] > 0
    for name in ("report.md", "rounds.png", "bytes.png", "latency.png", "contact_sheet.png"):
        assert (out / name).stat().st_size > 0


def test_broker_answers_equal_offline_metrics(mini_report) -> None:
    broker = mini_report[0]["broker"]
    assert broker["matches_offline"] is True
    assert broker["metrics"] == broker["offline"]
    assert broker["top10_agreement"] == 1.0
    assert broker["merge"] == {"score": broker["queries"]}  # one model version everywhere


def test_federated_result_is_the_final_round(mini_report) -> None:
    report = mini_report[0]
    last = report["rounds"][-1]
    assert all(report["methods"]["federated"][k] == last[k] for k in ("R1", "mAP"))


def test_contact_sheet_marks_hits_against_ground_truth(mini_report) -> None:
    """Each sheet query is titled and every hit framed green (the person described) or red."""
    from PIL import Image

    _, out = mini_report
    sheet = Image.open(out / "contact_sheet.png").convert("RGB")
    colours = {c for _, c in sheet.getcolors(maxcolors=1 << 20)}
    # 8 hits per query, and no person has 8 test crops in the mini gallery: some are wrong
    assert (200, 0, 0) in colours
