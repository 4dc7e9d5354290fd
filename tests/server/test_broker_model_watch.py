"""The broker follows the global adapter: base model at start, newer adapters swapped in."""

from __future__ import annotations

import pytest
from broker_fixtures import ScriptedNode, broker_config

from common.adapters import latest_adapter as newest_adapter
from common.factory import create_model
from protos import broker_pb2
from server.broker.model_watch import ModelWatcher

pytestmark = pytest.mark.timeout(120)


def test_newest_adapter_rule(tmp_path, write_adapter):
    folder = tmp_path / "adapters"
    assert newest_adapter(folder) is None
    write_adapter(folder / "round-2", 2, seed=1)
    write_adapter(folder / "round-10", 10, seed=2)
    (folder / ".staging").mkdir()
    (folder / "junk").mkdir()
    assert newest_adapter(folder).path.name == "round-10"  # by round, not by name
    assert newest_adapter(folder / "round-2").round == 2  # an adapter dir itself


def test_broker_swaps_to_a_new_global_adapter(
    tmp_path, scripted_nodes, start_broker, write_adapter
):
    adapters = tmp_path / "global"
    config = broker_config(
        {"a": "127.0.0.1:1"}, model="tiny", adapter=str(adapters), adapter_poll_s=0.0
    )
    swapped = []
    watcher = ModelWatcher(config, on_model=swapped.append)
    base = watcher.load_initial()
    assert base.version == create_model("tiny").version  # no adapter yet: the base model
    assert not watcher.check()
    v1 = write_adapter(adapters / "round-1", 1, seed=3)
    assert watcher.check() and swapped[-1].version == v1
    assert not watcher.check()  # unchanged: nothing to do
    (adapters / "round-2").mkdir()
    (adapters / "round-2" / "fedretrieve_adapter.json").write_text("{broken")
    assert not watcher.check()  # incomplete adapter: ignored, current model kept
    v3 = write_adapter(adapters / "round-3", 3, seed=4)
    assert watcher.check() and swapped[-1].version == v3

    # end to end: the daemon loads base + newest adapter and nodes on it get the vector
    (node,) = scripted_nodes(ScriptedNode("a", [(1, 0.5)], model_version=v3))
    handle = start_broker(
        broker_config({"a": node.address}, model="tiny", adapter=str(adapters)),
        encoder="from-config",
    )
    response = handle.stub.Search(
        broker_pb2.BrokerSearchRequest(text="red coat", k=3), metadata=handle.auth(), timeout=30
    )
    assert response.model_version == v3 and response.coverage.nodes[0].used_vector


def test_a_refused_global_adapter_is_retried_once_its_files_change(tmp_path, write_adapter):
    """A `cp -r` that wrote the manifest first is refused half-copied, then picked up
    once complete (it used to be remembered as refused until the broker restarted)."""
    import shutil

    staged = tmp_path / "staged" / "round-1"
    version = write_adapter(staged, 1, seed=3)
    target = tmp_path / "global" / "round-1"
    config = broker_config(
        {"a": "127.0.0.1:1"}, model="tiny", adapter=str(target.parent), adapter_poll_s=0.0
    )
    swapped = []
    watcher = ModelWatcher(config, on_model=swapped.append)
    watcher.load_initial()  # nothing there yet: the base model
    target.mkdir(parents=True)
    weights = next(p for p in staged.iterdir() if p.suffix == ".safetensors")
    for item in staged.iterdir():
        if item != weights:
            shutil.copy(item, target / item.name)
    (target / weights.name).write_bytes(weights.read_bytes()[:100])  # half-copied
    assert not watcher.check() and not swapped  # refused: the weights are truncated
    assert not watcher.check()  # unchanged files: not tried again
    shutil.copy(weights, target / weights.name)  # the copy completes in place
    assert watcher.check() and swapped[-1].version == version
