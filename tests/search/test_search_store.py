"""Persistence of the index: snapshot + WAL round trips, crashes, and clear errors for bad or foreign files."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from services.gateway.search.index import IndexParams, Product, l2_normalise
from services.gateway.search.store import SNAPSHOT, BindingMismatch, PersistentIndex, SearchIndexError

DIM = 32
PARAMS = IndexParams(dim=1, exact_below=50)


def vectors(count: int, seed: int = 0) -> np.ndarray:
    return l2_normalise(np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32))


def open_store(directory: Path, **kwargs) -> PersistentIndex:  # type: ignore[no-untyped-def]
    return PersistentIndex.open(directory, kwargs.pop("model", "m"), PARAMS, **kwargs)


def fill(store: PersistentIndex, data: np.ndarray, start: int = 0) -> None:
    for i, vector in enumerate(data, start):
        store.put(Product(f"p{i}", f"c{i % 3}", {"i": str(i)}), vector, "1")


def top_ids(store: PersistentIndex, data: np.ndarray) -> list[list[str]]:
    return [[h.product.product_id for h in store.search(v, 5)] for v in data[:20]]


@pytest.mark.parametrize("snapshot_ops", [10_000, 40], ids=["wal-only", "snapshot-and-wal"])
def test_round_trip(tmp_path: Path, snapshot_ops: int) -> None:
    data = vectors(120)
    store = open_store(tmp_path, snapshot_ops=snapshot_ops)
    fill(store, data)
    if store.snapshot_due:
        assert store.snapshot()
    fill(store, data[:10], start=1000)  # after the snapshot: only in the WAL
    store.delete("p3")
    store.put(Product("p4", "replaced", {}), data[50], "1")
    before = top_ids(store, data)
    # Simulate a crash: no close(), no final snapshot; only the lock is released.
    store._unlock()
    reopened = open_store(tmp_path)
    assert len(reopened) == 129
    assert reopened.index is not None and reopened.index.get("p4") == Product("p4", "replaced", {})
    assert reopened.index.get("p3") is None
    assert top_ids(reopened, data) == before
    assert reopened.binding is not None and (reopened.binding.model_version, reopened.binding.dim) == ("1", DIM)
    reopened.close()
    # A clean close leaves one snapshot and an empty log.
    assert (tmp_path / SNAPSHOT).exists()
    assert sum(p.stat().st_size for p in tmp_path.glob("wal-*.log")) == 0
    assert top_ids(open_store(tmp_path), data) == before


def test_torn_last_record_is_dropped(tmp_path: Path) -> None:
    data = vectors(10)
    store = open_store(tmp_path)
    fill(store, data)
    store._unlock()
    log = sorted(tmp_path.glob("wal-*.log"))[-1]
    log.write_bytes(log.read_bytes()[:-100])  # the last put was cut off mid-line
    reopened = open_store(tmp_path)
    assert len(reopened) == 9
    reopened.put(Product("p9", "c0", {}), data[9], "1")  # appends cleanly after the truncated record
    reopened._unlock()
    assert len(open_store(tmp_path)) == 10


def test_corrupt_log_record_is_a_clear_error(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    fill(store, vectors(10))
    store._unlock()
    log = sorted(tmp_path.glob("wal-*.log"))[-1]
    lines = log.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b'"c', b'"x', 1)  # a flipped byte inside a complete record
    log.write_bytes(b"\n".join(lines))
    with pytest.raises(SearchIndexError, match=r"line 4 is corrupt.*CRC"):
        open_store(tmp_path)


def test_corrupt_snapshot_is_a_clear_error(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    fill(store, vectors(60))
    store.close()
    snapshot = tmp_path / SNAPSHOT
    damaged = bytearray(snapshot.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(damaged))
    with pytest.raises(SearchIndexError, match="is corrupt"):
        open_store(tmp_path)
    snapshot.write_bytes(b"not a zip file at all")
    with pytest.raises(SearchIndexError, match="is corrupt"):
        open_store(tmp_path)


def test_other_model_or_version_is_a_clear_error(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    fill(store, vectors(5))
    store.close()
    with pytest.raises(SearchIndexError, match="model 'm'.*searches with 'other'"):
        open_store(tmp_path, model="other")
    with pytest.raises(SearchIndexError, match="version 1.*GATEWAY_SEARCH_MODEL_VERSION=2"):
        open_store(tmp_path, expected_version="2")
    store = open_store(tmp_path, expected_version="1")
    with pytest.raises(BindingMismatch, match="version 2"):
        store.put(Product("new", "c0", {}), vectors(1)[0], "2")
    with pytest.raises(BindingMismatch, match="16 values"):
        store.put(Product("new", "c0", {}), np.ones(16, dtype=np.float32), "1")
    assert len(store) == 5
    store.close()


def test_one_gateway_per_directory(tmp_path: Path) -> None:
    first = open_store(tmp_path)
    with pytest.raises(SearchIndexError, match="in use by another gateway"):
        open_store(tmp_path)
    first.close()
    open_store(tmp_path).close()


def test_snapshot_during_writes_loses_nothing(tmp_path: Path) -> None:
    data = vectors(400)
    store = open_store(tmp_path, snapshot_ops=25)
    snapshots = []

    def snapshotter() -> None:
        while len(store) < 400:
            if store.snapshot_due:
                snapshots.append(store.snapshot())

    thread = threading.Thread(target=snapshotter)
    thread.start()
    fill(store, data)
    thread.join(timeout=60)
    store._unlock()
    assert any(snapshots)
    reopened = open_store(tmp_path)
    assert len(reopened) == 400
    assert [ids[0] for ids in top_ids(reopened, data)] == [f"p{i}" for i in range(20)]
