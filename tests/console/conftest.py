"""Console test fixtures live in console_fixtures.py (importable helpers + fixtures).

The fleet (two real node daemons), its broker and the console are shared by the session:
starting them costs seconds, and no test changes them (the restart and failed-node tests
start their own broker and console).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from console_fixtures import (
    Fleet,
    browser,
    start_broker,
    start_console,
    start_fleet,
    stop_fleet,
    write_console_config,
)

__all__ = ["browser"]


@pytest.fixture(scope="session")
def tiny_model():
    """The real tiny model from common/model_configs (random init, no download)."""
    from common.factory import create_model

    return create_model("tiny")


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    running = start_fleet(tmp_path_factory.mktemp("fleet"))
    yield running
    stop_fleet(running)


@pytest.fixture(scope="session")
def broker(fleet, tiny_model):
    run = start_broker(fleet.nodes, tiny_model)
    yield run
    run.stop()


@pytest.fixture(scope="session")
def console(broker, tmp_path_factory):
    """The console in front of the shared broker: `.url`, `.folder` (config, audit log)."""
    folder = tmp_path_factory.mktemp("console")
    running = start_console(write_console_config(folder, broker.address))
    running.folder = folder
    yield running
    running.stop()
