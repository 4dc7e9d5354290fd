"""The Flower ServerApp: read the run config once, run the strategy, keep every round.

For each round the global adapter is saved in PEFT format to `OUT/round-NNN/` (and at the
end to `OUT/final/`), evaluated on the server's held-out set when one is configured, and
logged with what moved: bytes sent to and received from each node, which updates were
accepted, rejected (with the reason) or failed. `OUT/history.json` holds it all and is
rewritten after every round, so an interrupted run still leaves its figures.

After the last round the final adapter goes to every connected node in an
`evaluate.handover` message; each node writes it into its daemon's adapter dir.

A run in which no round aggregated (every node failed, every update was rejected, SecAgg+
never reached its threshold) fails: one ERROR line says why, history.json records it under
"failed", no `final/` is written and nothing is handed over (the nodes would swap to the
untrained adapter for nothing). A bad run config fails the same way before any node is
contacted. Flower marks such a run failed (`flwr ls`); `flwr run --stream` itself exits 0
whatever the run did (Flower 1.41 does not report the run's status in its exit code).

Privacy (server/fl/privacy.py, docs/privacy.md): `secure-aggregation` runs every train
round through Flower's SecAgg+ (`SecAggPlusGrid`), `dp` wraps the strategy in Flower's DP
wrapper, and with DP on every round's log line and history row state epsilon so far.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from common.errors import ConfigError, FedRetrieveError
from common.round_plan import RoundPlan
from server.fl.privacy import PrivacyLedger, SecAggPlusGrid, wrap_dp
from server.fl.run_config import FlConfig
from server.fl.strategies import NODE_RECORD, RoundStats, UpdateSpec, build_strategy

# A child of Flower's logger: these lines show wherever Flower's do (console, `flwr run
# --stream`, `flwr log`), also in the ServerApp/ClientApp subprocesses of the deployment engine.
log = logging.getLogger("flwr").getChild(__name__)

HISTORY_FILE = "history.json"
HANDOVER_MESSAGE_TYPE = "evaluate.handover"


class FederatedRunFailed(FedRetrieveError):
    """The run produced nothing to hand over (its one-line reason is the message)."""


def build_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; `overrides` replace run-config keys (in-process `run_simulation`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = FlConfig.from_run_config(context.run_config, overrides)
        except ConfigError as err:
            log.error("federated run failed: invalid run config: %s", err)
            raise
        try:
            run_server(grid, cfg, run_id=int(context.run_id))
        except FederatedRunFailed as err:
            log.error("federated run failed: %s", err)
            raise

    return app


def payload_keys(state: dict, freeze_a: bool) -> list[str]:
    """The adapter keys that travel: all of them, or B only under FFA-LoRA."""
    from common.lora import is_lora_a

    return [k for k in state if not (freeze_a and is_lora_a(k))]


class RoundRecorder:
    """`evaluate_fn` for Strategy.start: called with the global adapter after every round.

    Saves it, evaluates it on the held-out set, and logs the round with its traffic.
    """

    def __init__(
        self,
        cfg: FlConfig,
        peft_model,
        strategy,
        out_dir: Path,
        *,
        ledger: PrivacyLedger | None = None,
        secagg: SecAggPlusGrid | None = None,
    ) -> None:
        from common.datasets import load_records

        self.cfg, self.model, self.strategy, self.out = cfg, peft_model, strategy, out_dir
        self.ledger, self.secagg = ledger, secagg
        self.records = []
        source = cfg.eval_source
        if source is not None:
            self.records = load_records(source, split=cfg.eval_split)
            if not self.records:
                log.warning(
                    "no %r records in %s: no server-side evaluation", cfg.eval_split, source
                )
        self.bank = self.text_cache = None
        self.history: list[dict] = []
        self.latest: ArrayRecord | None = None
        self._last = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        from common.adapters import save_adapter
        from common.lora import set_adapter_state

        round_seconds = time.perf_counter() - self._last
        self.latest = arrays
        set_adapter_state(
            self.model,
            arrays.to_torch_state_dict(),
            allow_subset=self.cfg.freeze_a,
            where=f"global adapter of round {server_round}",
        )
        row: dict[str, Any] = {"round": server_round}
        if server_round > 0:
            row["seconds"] = round(round_seconds, 3)
            path = self.out / f"round-{server_round:03d}"
            manifest = save_adapter(
                self.model, path, round=server_round, extra={"strategy": self.cfg.strategy}
            )
            row["adapter"] = str(path)
            row["model_version"] = manifest.model_version
            stats = self.strategy.rounds.get(server_round)
            if self.secagg is not None and server_round in self.secagg.rounds:
                secure = self.secagg.rounds[server_round]
                row["secagg"] = secure.to_dict()
                if stats is not None:  # what each node uploaded: its masked vector
                    stats.upload_bytes = dict(secure.masked_bytes)
            row.update(_traffic(stats))
            if self.ledger is not None:
                if stats is not None and stats.aggregated:
                    self.ledger.release()
                row["epsilon"] = round(self.ledger.epsilon, 6)
                row["dp_releases"] = self.ledger.releases
        metrics = self._evaluate()
        if metrics is not None:
            row["global"] = {k: round(float(v), 4) for k, v in metrics.items()}
        self.history.append(row)
        self.write_history()
        _log_round(self.cfg, row)
        self._last = time.perf_counter()
        return metrics

    def _evaluate(self) -> MetricRecord | None:
        if not self.records:
            return None
        from common.evaluate import evaluate
        from common.train import ImageBank, TextFeatureCache, core_model

        core = core_model(self.model)
        if self.bank is None:
            norm = None
            if self.cfg.camera_norm:  # what nodes with `[camera-norm]` serve: per camera
                from common.camera_norm import gallery_camera_norm

                norm = gallery_camera_norm(self.records)
            self.bank = ImageBank(self.records, core.preprocess, norm)
            self.text_cache = TextFeatureCache.load(self.cfg.text_cache, core.text_fingerprint)
        metrics = evaluate(self.model, self.records, text_cache=self.text_cache, bank=self.bank)
        return MetricRecord({k: float(metrics[k]) for k in ("R1", "R5", "R10", "mAP", "mINP")})

    @property
    def aggregated_rounds(self) -> int:
        return sum(1 for r in self.history if r.get("aggregated"))

    def privacy(self) -> dict[str, Any]:
        """What protected this run: the report's `privacy` entry."""
        ledger = self.ledger
        return {
            "secure_aggregation": self.secagg is not None,
            "dp": self.cfg.dp,
            "epsilon": round(ledger.epsilon, 6) if ledger else None,
            "delta": ledger.delta if ledger else None,
            "noise_multiplier": ledger.noise_multiplier if ledger else None,
            "sampling_rate": ledger.sampling_rate if ledger else None,
            "releases": ledger.releases if ledger else 0,
        }

    def write_history(self, **extra: Any) -> Path:
        data = {
            "config": self.cfg.to_dict(),
            "rounds": self.history,
            "privacy": self.privacy(),
            **extra,
        }
        path = self.out / HISTORY_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path


def run_server(grid: Grid, cfg: FlConfig, *, run_id: int = 0) -> dict:
    """Run the whole federated training; return the history written to OUT/history.json."""
    import torch

    from common.adapters import save_adapter
    from common.lora import get_adapter_state, lora_a_digest, lora_parameter_count

    if cfg.server_threads:
        torch.set_num_threads(cfg.server_threads)
    out = Path(cfg.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ledger = PrivacyLedger.from_config(cfg)
    rounds = cfg.num_server_rounds
    if ledger is not None and cfg.dp_max_epsilon:
        rounds = _rounds_within(ledger, cfg.dp_max_epsilon, rounds)
        if rounds == 0:
            raise FederatedRunFailed(
                f"one round already spends epsilon {ledger.epsilon_after(1):.3g} > "
                f"dp-max-epsilon {cfg.dp_max_epsilon}; raise dp-noise-multiplier"
            )
        if rounds < cfg.num_server_rounds:
            log.warning(
                "dp-max-epsilon %g allows %d of %d rounds (epsilon %.3f at delta %g)",
                cfg.dp_max_epsilon,
                rounds,
                cfg.num_server_rounds,
                ledger.epsilon_after(rounds),
                ledger.delta,
            )
    cfg = replace(cfg, num_server_rounds=rounds)  # the budget's rounds, for every node
    plan = cfg.round_plan()
    # The base model with a fresh adapter (B = 0: round 0 is the base model itself), built
    # exactly as every node builds its own from the plan, so FFA's frozen A agrees.
    peft_model = plan.create_adapter()
    template = get_adapter_state(peft_model)
    plan = replace(plan, lora_a_digest=lora_a_digest(template))
    keys = payload_keys(template, cfg.freeze_a)
    initial = ArrayRecord(OrderedDict((k, template[k]) for k in keys))
    spec = UpdateSpec.from_arrays(initial)
    strategy = build_strategy(cfg, spec)
    secure = SecAggPlusGrid(grid, cfg) if cfg.secure_aggregation else None
    recorder = RoundRecorder(cfg, peft_model, strategy, out, ledger=ledger, secagg=secure)
    base = peft_model.get_base_model()
    log.info(
        "federated run %d: strategy %s, model %s, %d rounds; each node receives and sends "
        "%d tensors (%s) per round; full model %s",
        run_id,
        cfg.strategy,
        base.version,
        cfg.num_server_rounds,
        len(keys),
        _human(spec.nbytes),
        _human(base.num_parameters() * 4),
    )
    if secure is not None or ledger is not None:
        shares, threshold = cfg.secagg_shares()
        dp = cfg.dp
        if ledger is not None:
            budget = ledger.epsilon_after(cfg.num_server_rounds)
            dp += (
                f" (z {cfg.dp_noise_multiplier}, clip {cfg.dp_clip_norm}, delta "
                f"{cfg.dp_delta:g}: epsilon {budget:.3f} after {cfg.num_server_rounds} rounds)"
            )
        log.info(
            "privacy: secure aggregation %s; dp %s",
            f"SecAgg+ ({shares} shares, threshold {threshold})" if secure else "off",
            dp,
        )
    started = time.perf_counter()
    wrap_dp(cfg, strategy).start(
        grid=secure or grid,
        initial_arrays=initial,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord(plan.to_config()),
        evaluate_config=ConfigRecord(plan.to_config()),
        evaluate_fn=recorder,
    )
    if not recorder.aggregated_rounds:
        reason = _no_round_reason(recorder.history, cfg)
        recorder.write_history(failed=reason)
        raise FederatedRunFailed(reason)
    final = recorder.latest or initial
    set_final(peft_model, final, cfg)
    manifest = save_adapter(
        peft_model, out / "final", round=cfg.num_server_rounds, extra={"strategy": cfg.strategy}
    )
    handover = hand_over(grid, cfg, final, plan)
    summary = {
        "final": str(out / "final"),
        "final_model_version": manifest.model_version,
        "handover": handover,
        "payload_bytes": spec.nbytes,
        "adapter_parameters": lora_parameter_count(peft_model),
        "model_parameters": base.num_parameters(),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    recorder.write_history(**summary)
    log.info("final global adapter: %s (%s)", out / "final", manifest.model_version)
    return {"config": cfg.to_dict(), "rounds": recorder.history, **summary}


def set_final(peft_model, arrays: ArrayRecord, cfg: FlConfig) -> None:
    """Load the last aggregated global adapter into the model `final/` is saved from."""
    from common.lora import set_adapter_state

    set_adapter_state(
        peft_model, arrays.to_torch_state_dict(), allow_subset=cfg.freeze_a, where="final"
    )


def _rounds_within(ledger: PrivacyLedger, max_epsilon: float, rounds: int) -> int:
    """The most rounds (<= `rounds`) whose epsilon stays within `max_epsilon`."""
    allowed = 0
    while allowed < rounds and ledger.epsilon_after(allowed + 1) <= max_epsilon:
        allowed += 1
    return allowed


def _no_round_reason(history: list[dict], cfg: FlConfig) -> str:
    """One line: why no round produced a new global adapter."""
    rows = [r for r in history if r.get("round", 0) > 0]
    failed = sum(len(r.get("failed", {})) for r in rows)
    rejected = sum(len(r.get("rejected", {})) for r in rows)
    halted = [r["secagg"]["halted_at"] for r in rows if r.get("secagg", {}).get("halted_at")]
    sampled = sum(r.get("sampled", 0) for r in rows)
    what = f"{failed} node failure(s), {rejected} rejected update(s) over {sampled} sampled"
    if halted:
        what += f"; secure aggregation halted in {len(halted)} round(s) ({halted[0]} stage)"
    return (
        f"no round of {len(rows)} aggregated an update ({what}; min-updates "
        f"{cfg.min_updates}); nothing written to final/ and nothing handed over"
    )


def hand_over(grid: Grid, cfg: FlConfig, arrays: ArrayRecord, plan: RoundPlan) -> dict[str, str]:
    """Send the final adapter to every connected node; node -> written path (or the error)."""
    config = ConfigRecord(replace(plan, server_round=cfg.num_server_rounds).to_config())
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=node_id,
            message_type=HANDOVER_MESSAGE_TYPE,
        )
        for node_id in grid.get_node_ids()
    ]
    result: dict[str, str] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node = str(reply.metadata.src_node_id)
        if reply.has_error():
            result[node] = f"error: {reply.error.reason}"
            log.warning("hand-over to node %s failed: %s", node, reply.error.reason)
            continue
        info = reply.content.config_records.get(NODE_RECORD) or {}
        name = info.get("node-name") or node
        result[str(name)] = str(info.get("adapter-path") or "(no adapter-dir)")
    missing = len(messages) - len(result)
    if missing:
        log.warning("hand-over: %d node(s) did not answer in time", missing)
    return result


def _traffic(stats: RoundStats | None) -> dict[str, Any]:
    if stats is None:
        return {}
    name = lambda node: stats.node_names.get(node, str(node))  # noqa: E731
    return {
        "sampled": stats.sampled,
        "payload_bytes": stats.payload_bytes,
        "upload_bytes": {name(n): b for n, b in stats.upload_bytes.items()},
        "accepted": [name(n) for n in stats.accepted],
        "rejected": {name(n): r for n, r in stats.rejected.items()},
        "failed": {str(n): r for n, r in stats.failed.items()},
        "aggregated": stats.aggregated,
        "secure": stats.secure,
        "train_metrics": stats.train_metrics,
        "partial_train_metrics": stats.partial_train_metrics,
        "evaluate_metrics": stats.evaluate_metrics,
        **(
            {  # share-memories: what each node sent and was sent beside its adapter
                "memory_upload_bytes": {name(n): b for n, b in stats.memory_upload_bytes.items()},
                "memory_download_bytes": {
                    name(n): b for n, b in stats.memory_download_bytes.items()
                },
            }
            if stats.memory_upload_bytes or stats.memory_download_bytes
            else {}
        ),
    }


def _log_round(cfg: FlConfig, row: dict) -> None:
    metrics = row.get("global")
    score = f"R1 {metrics['R1']:.2f} mAP {metrics['mAP']:.2f}" if metrics else "no held-out set"
    if row["round"] == 0:
        log.info("round 0 (base model + fresh adapter): %s", score)
        return
    privacy = ""
    if "epsilon" in row:
        privacy += f" | epsilon {row['epsilon']:.3f} (delta {cfg.dp_delta:g})"
    if "secagg" in row:
        secure = row["secagg"]
        privacy += (
            f" | SecAgg+ {secure['survivors']}/{secure['sampled']} in the sum, "
            f"{secure['seconds']:.1f}s"
        )
    log.info(
        "round %d/%d: %s | updates %d accepted, %d rejected, %d failed | per node %s down, "
        "%s up | %.1fs%s",
        row["round"],
        cfg.num_server_rounds,
        score,
        len(row.get("accepted", [])),
        len(row.get("rejected", {})),
        len(row.get("failed", {})),
        _human(row.get("payload_bytes", 0)),
        _human(max(row.get("upload_bytes", {}).values(), default=0)),
        row["seconds"],
        privacy,
    )


def _human(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


app = build_server_app()
