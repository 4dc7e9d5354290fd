"""Keep the broker's query model equal to the current global model.

After a federated round the global adapter changes and nodes hot-swap to it. If the broker
kept embedding queries with the old model, no node would use its vectors (versions differ)
and every node would encode the text itself again. So the broker watches its `adapter`
path with the nodes' own rule, `common.adapters.latest_adapter`. A candidate that fails to
load is logged and not retried until it changes; the broker keeps serving with the model
it has.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.adapters import FilesStamp, files_stamp, latest_adapter
from common.errors import FedRetrieveError
from server.broker.config import BrokerConfig

log = logging.getLogger(__name__)


def _create_model(spec: str, adapter: Path | None) -> Any:
    from common.factory import create_model

    model = create_model(spec, adapter=adapter)
    model.eval()
    return model


class ModelWatcher:
    """Loads the global model at start and reloads it when the global adapter changes."""

    def __init__(
        self,
        config: BrokerConfig,
        on_model: Callable[[Any], None],
        *,
        load: Callable[[str, Path | None], Any] = _create_model,
    ) -> None:
        self.config = config
        self._on_model = on_model
        self._load = load
        self._current: tuple[str, str] | None = None
        # refused adapters and their files then: retried once the files change (an adapter
        # directory completed in place after a first, half-copied look)
        self._refused: dict[tuple[str, str], FilesStamp] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load_initial(self) -> Any:
        """The model to start with: base + newest adapter (base alone when none exists yet)."""
        if self.config.model is None:
            return None
        choice = latest_adapter(self.config.adapter)
        model = self._load(self.config.model, choice.path if choice else None)
        self._current = choice.key if choice else None
        if self.config.adapter and choice is None:
            log.warning("no adapter at %s yet; embedding with the base model", self.config.adapter)
        return model

    def check(self) -> bool:
        """Swap in a newer global adapter if there is one; True when the model changed."""
        if self.config.model is None:
            return False
        choice = latest_adapter(self.config.adapter)
        if choice is None or choice.key == self._current:
            return False
        if self._refused.get(choice.key) == files_stamp(choice.path):
            return False
        try:
            model = self._load(self.config.model, choice.path)
        except FedRetrieveError as err:
            log.error("global adapter %s refused, keeping the current model: %s", choice.path, err)
            self._refused[choice.key] = files_stamp(choice.path)
            return False
        self._on_model(model)
        self._current = choice.key
        return True

    def start(self) -> None:
        if self.config.model is None or not self.config.adapter or self.config.adapter_poll_s <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="model-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.adapter_poll_s):
            try:
                self.check()
            except Exception:  # keep watching; the traceback is in the log
                log.exception("checking the global adapter failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
