"""Writes the simulation's report: report.json (a contract other tools read), report.md
(a short experiment write-up) and the PNG plots it refers to."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt
from PIL import Image

LABELS = {
    "zero_shot": "zero-shot",
    "zero_shot_camera_norm": "zero-shot + camera normalisation",
    "zero_shot_colour_match": "zero-shot + colour moments matched to the source cameras",
    "local_only": "local-only (mean)",
    "local_only_best": "local-only (best node)",
    "centralized": "centralised",
}


def write_report(report: dict, out: Path, federated: dict, serving) -> None:
    plots = {
        "rounds": plot_rounds(report, out / "rounds.png"),
        "bytes": plot_bytes(report, out / "bytes.png"),
    }
    if serving is not None:
        plots["latency"] = plot_latency(serving.latencies_ms, out / "latency.png")
        if serving.sheet_queries:
            plots["contact_sheet"] = stack_sheets(serving.sheet_queries, out / "contact_sheet.png")
    report["plots"] = {k: str(v.name) for k, v in plots.items() if v}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))


def privacy_line(privacy: dict) -> str:
    """One sentence on what protected the reported run (docs/privacy.md)."""
    secure = (
        "with SecAgg+ (the server saw only sums)"
        if privacy.get("secure_aggregation")
        else ("without secure aggregation (the server saw every update)")
    )
    if privacy.get("dp", "off") in ("off", None):
        return f"Trained {secure}, without differential privacy."
    return (
        f"Trained {secure}, with {privacy['dp']} DP: epsilon {privacy['epsilon']:.3f} "
        f"at delta {privacy['delta']:g} after the run."
    )


def plot_rounds(report: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("R1", "mAP"), strict=True):
        for name, rows in report["strategies"].items():
            ax.plot(
                [r["round"] for r in rows],
                [r[key] for r in rows],
                marker="o",
                label=f"federated {name}",
            )
        for method, style in (
            ("zero_shot", ":"),
            ("zero_shot_camera_norm", (0, (1, 4))),
            ("local_only", "--"),
            ("centralized", "-."),
        ):
            if method in report["methods"]:
                ax.axhline(
                    report["methods"][method][key],
                    linestyle=style,
                    color="grey",
                    label=LABELS[method],
                )
        ax.set_xlabel("round")
        ax.set_ylabel(f"{key} (%)")
        ax.set_title(f"{key} on the union test gallery")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bytes(report: dict, path: Path) -> Path:
    comm = report["communication"]
    names = [f"adapter ({n})" for n in comm["per_strategy"]] + ["full model"]
    values = [*comm["per_strategy"].values(), comm["full_model_bytes"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [v / 1e6 for v in values], color=["tab:blue"] * (len(names) - 1) + ["grey"])
    ax.set_yscale("log")
    ax.set_ylabel("MB per node per round (upload)")
    ax.set_title("What one node sends each round")
    for i, v in enumerate(values):
        ax.text(i, v / 1e6, f"{v / 1e6:.3g} MB", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(latencies_ms: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(latencies_ms, bins=40, color="tab:green")
    ax.set_xlabel("broker query latency (ms), client side")
    ax.set_ylabel("queries")
    ax.set_title(f"{len(latencies_ms)} operator queries through the broker")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stack_sheets(paths: list[str], out: Path) -> Path:
    sheets = [Image.open(p).convert("RGB") for p in paths]
    width = max(s.width for s in sheets)
    height = sum(s.height for s in sheets)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for s in sheets:
        canvas.paste(s, (0, y))
        y += s.height
    canvas.save(out)
    return out


def table(report: dict) -> str:
    keys = ("R1", "R5", "R10", "mAP", "mINP")
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in report["methods"].items():
        lines.append(
            f"| {LABELS.get(name, name.replace('_', ' '))} | "
            + " | ".join(f"{m[k]:.2f}" for k in keys)
            + " |"
        )
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m, comm, timing = report["methods"], report["communication"], report["timing"]
    cfg = report["setup"]["config"]
    fed, zs = m["federated"], m["zero_shot"]
    parts = [
        "# fedretrieve simulation report",
        "",
        "## Setup",
        f"- Data: `{report['setup']['data']}`; base model `{report['setup']['base_model']}`.",
        f"- Federated: strategies {', '.join(cfg['federated']['strategies'])} "
        f"(reported as *federated*: `{cfg['federated']['default']}`), "
        f"{cfg['federated']['rounds']} rounds x {cfg['federated']['local_epochs']} local "
        f"epoch(s), lr {cfg['federated']['lr']}, on Flower's simulation engine; only LoRA "
        "adapters travel.",
        "- Baselines on the same split and the same number of epochs: zero-shot base model, "
        "zero-shot + camera normalisation (per-camera gray-world gains and black/white levels "
        "from each camera's own gallery images; no labels, no training), local-only (each "
        "node alone, evaluated on the whole gallery), centralised LoRA on the pooled training "
        "data (the upper bound federated learning may not see).",
        (
            "- Camera normalisation on (`camera-norm = true`): federated, local-only and "
            "centralised train and are evaluated on crops normalised per camera, and the node "
            "daemons serve them so; zero-shot is the base model on the raw crops."
            if cfg.get("camera_norm")
            else "- Camera normalisation off: every method but zero-shot + camera "
            "normalisation sees the raw crops."
        ),
        *(
            [
                "- Label-free nodes (docs/label-free.md): the federated run trains without "
                "captions at those nodes; local-only and centralised still train with the train "
                "captions, a supervised reference rather than a label-free baseline."
            ]
            if "federated_label_free" in m or "federated_mixed" in m
            else []
        ),
        "- Metrics: text-to-image Rank-k, mAP, mINP in percent over every test caption "
        "against the union gallery of all nodes' test images.",
        "",
        "## Results",
        table(report),
        "",
        "![Rank-1 and mAP per round](rounds.png)",
        "",
        "## Communication",
        f"Each node uploads {comm['adapter_bytes_per_node_per_round'] / 1e6:.3f} MB per round "
        f"with the default strategy, {100 * comm['fraction_of_full_model']:.2f}% of the "
        f"{comm['full_model_bytes'] / 1e6:.1f} MB full model; images sent: "
        f"{comm['image_bytes_sent']} bytes."
        + (
            f" Shared tracklet memories (share-memories): at most "
            f"{comm['memory_upload_bytes_per_node_per_round_max'] / 1e3:.1f} kB up and "
            f"{comm['memory_download_bytes_per_node_per_round_max'] / 1e3:.1f} kB down per "
            "node and round, appearance features of the people a node saw (docs/label-free.md)."
            if "memory_upload_bytes_per_node_per_round_max" in comm
            else ""
        ),
        "",
        "![bytes per round](bytes.png)",
        "",
        "## Privacy",
        privacy_line(report.get("privacy") or {}),
        "",
    ]
    if "broker" in report:
        b = report["broker"]
        parts += [
            "## Serving through the broker",
            f"{b['queries']} test captions sent as operator queries to the broker, which "
            f"embedded each once and fanned it out to the node daemons (hot swap to the final "
            f"adapter took {b['hot_swap_s']} s). Latency p50 {b['p50_ms']} ms, p99 "
            f"{b['p99_ms']} ms; full coverage on {100 * b['coverage']:.1f}% of queries; merge "
            f"modes {b['merge']}. Rank-1 from the broker's merged answers: {b['R1']:.2f} "
            f"(offline on the union gallery: {b['offline']['R1']:.2f}; largest metric "
            f"difference {b['max_metric_diff']:.4f}; top-10 lists identical on "
            f"{100 * b['top10_agreement']:.1f}% of queries) -> matches offline: "
            f"**{b['matches_offline']}**.",
            "",
            *_student_lines(b.get("students", {})),
            "![latency](latency.png)",
            "",
            "![contact sheet](contact_sheet.png)",
            "",
        ]
    gain = fed["R1"] - zs["R1"]
    verdict = [
        f"Federated LoRA moves Rank-1 from {zs['R1']:.2f} (zero-shot) to "
        f"{fed['R1']:.2f} ({gain:+.2f} points)"
    ]
    if "local_only" in m:
        verdict.append(
            f"against {m['local_only']['R1']:.2f} for a node training alone "
            f"(best node {m['local_only_best']['R1']:.2f})"
        )
    if "centralized" in m:
        verdict.append(
            f"and {m['centralized']['R1']:.2f} for centralised training "
            f"({fed['R1'] - m['centralized']['R1']:+.2f} points)"
        )
    att = report["attributable"]
    parts += [
        "## What it shows",
        "; ".join(verdict) + ".",
        f"Attributable to federated learning: federated - max(zero-shot + camera "
        f"normalisation, best local-only) = {att['R1']:+.2f} Rank-1, {att['mAP']:+.2f} mAP "
        f"(the stronger trivial baseline here: {LABELS.get(att['baseline'], att['baseline'])}).",
        *_colour_match_line(m, fed),
        *_seed_lines(report.get("seeds")),
        f"Total wall time {timing['total_s']} s; {timing['per_round_s']} s per "
        f"federated round. Stages: {timing['stages_s']}.",
        "",
    ]
    return "\n".join(parts)


def _seed_lines(seeds: dict | None) -> list[str]:
    """The default strategy over several FL seeds (`[federated] seeds`)."""
    if not seeds:
        return []
    per_seed = ", ".join(f"{r:.2f}" for r in seeds["R1"])
    return [
        f"Over FL seeds {seeds['seeds']}: Rank-1 {per_seed}; mean {seeds['R1_mean']:.2f} "
        f"(sd {seeds['R1_sd']:.2f}), mAP mean {seeds['mAP_mean']:.2f} (sd {seeds['mAP_sd']:.2f}); "
        f"attributable on the mean: {seeds['R1_attributable_mean']:+.2f} Rank-1, "
        f"{seeds['mAP_attributable_mean']:+.2f} mAP. The figures above are seed "
        f"{seeds['served']}'s, the run that was served."
    ]


def _colour_match_line(methods: dict, fed: dict) -> list[str]:
    """Federated beside the strongest label-free colour statistic (not in the attributable
    line, whose definition is the report contract's)."""
    match = methods.get("zero_shot_colour_match")
    if match is None:
        return []
    return [
        f"Beside the sceptic's stronger colour baseline ({LABELS['zero_shot_colour_match']}: "
        f"{match['R1']:.2f} Rank-1, {match['mAP']:.2f} mAP): federated "
        f"{fed['R1'] - match['R1']:+.2f} Rank-1, {fed['mAP'] - match['mAP']:+.2f} mAP."
    ]


def _student_lines(students: dict) -> list[str]:
    """The nodes that served a distilled student, and how the broker merged them."""
    if not students:
        return []
    lines = [
        "Nodes serving a distilled student (docs/compress.md), so the broker's answers are "
        "not expected to match the offline teacher:",
        "",
    ]
    for node, s in sorted(students.items()):
        how = "verified, merged by score" if s["verified"] else "not verified, fused by rank"
        lines.append(
            f"- {node}: {s['model_version']} (agreement {s['agreement']:.3f} with the "
            f"broker's model; {how}){': ' + s['note'] if s['note'] else ''}"
        )
    return [*lines, ""]
