"""Index saves from several threads at once (the embedder and the swap thread both save):
each save is whole, the last one on disk reloads intact, and no temporary file is left."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from node_fixtures import make_config

from edge_node.config import IndexSettings
from edge_node.serving.gallery import Gallery
from edge_node.serving.index_store import IndexStore
from edge_node.serving.indexer import INDEX_FILE, META_FILE, VectorIndex
from edge_node.serving.node import Generation, Node

DIM = 64
THREADS = 4
SAVES_EACH = 15
ROUNDS = 25


def fake_backend(version: str) -> SimpleNamespace:
    """Just what saving and Status read; nothing here embeds."""
    return SimpleNamespace(name="fake", version=version, adapter_version="", embed_dim=DIM, note="")


def filled_index(version: str, n: int, seed: int) -> VectorIndex:
    index = VectorIndex(DIM, IndexSettings(), version)
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    index.add(np.arange(1, n + 1, dtype=np.int64), vectors)
    return index


def hammer(saves: list[Callable[[], None]], times: int = SAVES_EACH) -> list[BaseException]:
    """Run each save `times` times on its own thread, all released together."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(saves))

    def worker(save: Callable[[], None]) -> None:
        start.wait()
        for _ in range(times):
            try:
                save()
            except BaseException as err:  # collected: the test names them
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(save,)) for save in saves]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a save hung"
    return errors


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in (INDEX_FILE, META_FILE))


def saved_version(directory: Path) -> str:
    return json.loads((directory / META_FILE).read_text())["version"]


def test_concurrent_node_saves_leave_one_intact_index_and_no_temp_files(tmp_path: Path):
    config = make_config(tmp_path)
    gallery = Gallery(config.data_dir / "gallery", config.limits)
    backend = fake_backend("fake@v1")
    generation = Generation(backend, filled_index(backend.version, 4000, seed=0), None)
    node = Node(config, gallery, generation, lambda _adapter: backend)
    try:
        errors = hammer([node.save_index] * THREADS)
        assert not errors, errors[:3]
        assert leftovers(node.index_dir) == []
        loaded = VectorIndex.load(node.index_dir, config.index, backend.version, DIM)
        assert loaded is not None and len(loaded) == 4000
    finally:
        node.close()
    assert leftovers(node.index_dir) == []


def test_saves_racing_a_swap_never_pair_one_index_with_the_others_metadata(tmp_path: Path):
    """Two generations (before and after a swap) saved into one directory at once, round
    after round: after each round the files are one save's pair, never a blob beside
    another save's hash (which the next start would reject and rebuild)."""
    store = IndexStore(tmp_path / "index", save_interval_s=0.0)
    old = Generation(fake_backend("model@v1"), filled_index("model@v1", 3000, seed=1), None)
    new = Generation(fake_backend("model@v2"), filled_index("model@v2", 2000, seed=2), None)
    for _ in range(ROUNDS):
        errors = hammer([lambda: store.save(lambda: old), lambda: store.save(lambda: new)], 1)
        assert not errors, errors[:3]
        assert leftovers(store.directory) == []
        version = saved_version(store.directory)
        loaded = VectorIndex.load(store.directory, IndexSettings(), version, DIM)
        assert loaded is not None, "index file and metadata come from different saves"
        assert len(loaded) == {"model@v1": 3000, "model@v2": 2000}[version]


def test_a_save_is_due_only_after_vectors_were_added_and_the_interval_passed(tmp_path: Path):
    store = IndexStore(tmp_path / "index", save_interval_s=0.0)
    gen = Generation(fake_backend("model@v1"), filled_index("model@v1", 10, seed=3), None)
    assert not store.note_added(0)
    assert store.note_added(5)
    store.save(lambda: gen)
    assert not store.note_added(0)  # the save cleared it
    assert not IndexStore(tmp_path / "other", save_interval_s=3600.0).note_added(5)
