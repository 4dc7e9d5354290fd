"""Federated training on one machine: the real ServerApp and ClientApp on Flower's simulation
engine (Ray backend), one virtual SuperNode per node of the dataset.

`run_federated` is what `fedretrieve fl simulate` and the demo call. The apps are the same
objects `flwr run` and the deployment engine load; only their run config is passed in
directly (`run_simulation` has no run config of its own). The figures come back from the
ServerApp's `OUT/history.json`, the same file a deployment run leaves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)


@dataclass
class FederatedResult:
    """What a federated run produced (see OUT/history.json for everything)."""

    out_dir: Path
    final_adapter: Path
    rounds: list[dict]  # round 0 = base model; then per round: global, traffic, seconds
    payload_bytes: int  # sent to / from each node per round
    model_parameters: int
    wall_seconds: float
    handover: dict[str, str]
    privacy: dict  # {"secure_aggregation", "dp", "epsilon", "delta", ...} (history.json)

    def metric(self, key: str = "R1") -> list[float]:
        """Server-side held-out metric after each round (index 0: before training)."""
        return [r["global"][key] for r in self.rounds if "global" in r]

    @property
    def payload_fraction(self) -> float:
        """Bytes one node sends per round as a fraction of the full fp32 model."""
        return self.payload_bytes / (self.model_parameters * 4)

    @property
    def round_seconds(self) -> list[float]:
        return [r["seconds"] for r in self.rounds if "seconds" in r]

    @classmethod
    def from_history(cls, out_dir: Path) -> FederatedResult:
        path = out_dir / "history.json"
        if not path.is_file():
            raise Unavailable(f"the federated run left no {path}; see the log above")
        data = json.loads(path.read_text())
        if data.get("failed"):
            raise Unavailable(f"the federated run failed: {data['failed']}")
        if "final" not in data:
            done = len(data.get("rounds", [])) - 1
            raise Unavailable(
                f"the federated run stopped after {done} round(s) without a final adapter; "
                "see the ServerApp log above"
            )
        return cls(
            out_dir=out_dir,
            final_adapter=Path(data["final"]),
            rounds=data["rounds"],
            payload_bytes=int(data["payload_bytes"]),
            model_parameters=int(data["model_parameters"]),
            wall_seconds=float(data["wall_seconds"]),
            handover=dict(data.get("handover", {})),
            privacy=dict(data.get("privacy") or {}),
        )

    def epsilon(self) -> list[float | None]:
        """Epsilon so far after each round (None for round 0 or without DP)."""
        return [r.get("epsilon") for r in self.rounds]


def run_federated(
    data_dir: str | Path,
    nodes: int,
    rounds: int,
    strategy: str = "ffa",
    model_spec: str = "default",
    out_dir: str | Path = "runs/fl",
    *,
    options: Mapping[str, Any] | None = None,
    cpus: int | None = None,
    verbose: bool = False,
    client_mods: tuple = (),
) -> FederatedResult:
    """Run `rounds` federated rounds over `nodes` virtual nodes of `data_dir`.

    Every virtual node trains on the records of one `node` of the dataset (its cameras)
    and hands the final adapter to OUT/nodes/<node>/adapters/federated/. `options` are
    further run-config keys in kebab-case (`local-epochs`, `lr`, `max-steps`,
    `proximal-mu`, `eval-data`, ...; see server/fl/run_config.py).
    FLWR_HOME is set to OUT/.flwr unless already set, so nothing lands in the home dir;
    Ray's worker niceness to 0 unless set (RAY_worker_niceness). `client_mods`: further
    ClientApp mods, outermost first (benchmarks inject a node failure with one).
    """
    from flwr.simulation import run_simulation

    from edge_node.fl.client_app import build_client_app
    from server.fl.server_app import build_server_app

    if nodes < 1 or rounds < 1:
        raise ConfigError(f"need nodes >= 1 and rounds >= 1, got {nodes} and {rounds}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").unlink(missing_ok=True)
    cpus = cpus or max(1, min(os.cpu_count() or 1, 4))
    overrides = {
        "num-server-rounds": rounds,
        "strategy": strategy,
        "model": model_spec,
        "data-path": str(Path(data_dir).expanduser().resolve()),
        "out-dir": str(out),
        "min-nodes": nodes,
        "client-threads": cpus,
        **dict(options or {}),
    }
    overrides.setdefault("min-updates", 1)
    from server.fl.run_config import FlConfig

    FlConfig.from_run_config({}, overrides)  # fail here, not inside a thread, on a bad key
    node_keys = (
        "data-path",
        "gallery-root",
        "out-dir",
        "client-threads",
        "train-split",
        "eval-split",
        "text-cache",
        "camera-norm",
        "label-free",
        "label-free-nodes",
        "label-free-anchor",
        "label-free-anchor-weight",
        "label-free-camera",
        "label-free-text",
        "label-free-cluster",
        "label-free-link-cos",
        "label-free-link-window-s",
        "label-free-shared-cos",
        "share-memories",
    )
    client_overrides = {k: overrides[k] for k in node_keys if k in overrides}
    os.environ.setdefault("FLWR_HOME", str(out / ".flwr"))
    # Ray runs its workers at nice 15: on a shared machine the nodes would starve while the
    # ServerApp thread (nice 0) waits for them. The simulation is the job; run it as such.
    os.environ.setdefault("RAY_worker_niceness", "0")
    backend_config = {
        # One actor using every core: on a small machine one node at a time is fastest
        # and keeps a single model copy in memory.
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 200 * 1024 * 1024,
            "log_to_driver": verbose,
        },
    }
    log.info("federated simulation: %d nodes, %d rounds, %s, out %s", nodes, rounds, strategy, out)
    from server.fl.server_app import FederatedRunFailed

    _start_ray(backend_config["init_args"])
    try:
        run_simulation(
            server_app=build_server_app(overrides),
            client_app=build_client_app(client_overrides, mods=client_mods),
            num_supernodes=nodes,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    except FederatedRunFailed as err:  # Flower re-raises the ServerApp's error here
        raise Unavailable(f"the federated run failed: {err}") from None
    finally:
        _shutdown_ray()
    return FederatedResult.from_history(out)


RAY_START_ATTEMPTS = 3


def _start_ray(init_args: Mapping[str, Any]) -> None:
    """Start Ray's head here, before Flower: Flower uses a running Ray as it finds it.

    Why: on a busy machine Ray's head sometimes misses its own start-up deadline (its GCS
    port file times out). Inside Flower that failure happens in the simulation thread and
    surfaces only as nodes that never answer; here it is an exception we can retry, before
    anything of ours ran. The PYTHONPATH hand-over is what Flower's own start would do.
    """
    import ray

    if ray.is_initialized():  # a caller's own Ray: Flower will use it as it is
        return
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as err:  # Ray raises plain Exception/RuntimeError/ConnectionError
            _shutdown_ray()
            if attempt == RAY_START_ATTEMPTS:
                raise Unavailable(
                    f"Ray's head process did not start ({attempt} attempts): {err}"
                ) from None
            log.warning(
                "Ray did not start (%s); attempt %d of %d", err, attempt + 1, RAY_START_ATTEMPTS
            )


def _shutdown_ray() -> None:
    import ray

    with contextlib.suppress(Exception):  # whatever half-started, gone before the next try
        ray.shutdown()
