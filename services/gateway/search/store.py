"""Persist the vector index in one directory: a snapshot plus a write-ahead log (WAL), with a clear start-up check.

Layout of ``GATEWAY_SEARCH_DIR``::

    LOCK                  flock'ed by the one gateway that owns the directory
    snapshot.npz          header (JSON) + serialised graphs; written to a temp file, fsync'ed, renamed
    wal-00000003.log      writes since that snapshot, one line each: ``<crc32 hex> <json>``

Every write is appended (and flushed) to the WAL before it changes the index,
so a restarted or crashed gateway replays it on top of the snapshot. After
``snapshot_ops`` writes, and at shutdown, the index is snapshotted and older
WAL files are deleted. The header records the model name, model version and
embedding size the vectors were made with; anything that does not check out
(bad CRC, truncated zip, checksum mismatch, another model or version, another
dimension) raises :class:`SearchIndexError` naming the file and the fix,
instead of serving wrong answers. A torn last WAL line (a crash mid-append)
is dropped with a warning.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import usearch

from services.gateway.search.index import Hit, IndexParams, Product, VectorIndex

LOG = logging.getLogger(__name__)

FORMAT = 1
LIBRARY = "usearch"
SNAPSHOT = "snapshot.npz"
LOCK = "LOCK"
REEMBED_HINT = ("re-embed the catalog into an empty directory (python -m tools.index_catalog, see README) "
                "or point GATEWAY_SEARCH_DIR elsewhere")


class SearchIndexError(RuntimeError):
    """The index directory cannot be used as it is (corrupt, locked, or made with another model)."""


class BindingMismatch(ValueError):
    """An embedding does not fit the index (other model version or size)."""


@dataclass(frozen=True)
class Binding:
    """What the stored vectors were made with; queries must be embedded the same way."""

    model: str
    model_version: str
    dim: int


def wal_name(generation: int) -> str:
    return f"wal-{generation:08d}.log"


def encode_record(record: Mapping[str, Any]) -> bytes:
    body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_record(line: bytes) -> dict[str, Any]:
    crc, _, body = line.rstrip(b"\n").partition(b" ")
    if len(crc) != 8 or int(crc, 16) != zlib.crc32(body):
        raise ValueError("CRC mismatch")
    return json.loads(body)


def vector_to_text(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def vector_from_text(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


class PersistentIndex:
    """A :class:`VectorIndex` bound to one model version, kept in ``directory`` (or memory only when None).

    The index is created with the first product, whose embedding fixes the
    binding (model version and size). Writes are serialised and logged before
    they are applied; searches run concurrently with them through the index's lock.
    """

    def __init__(self, directory: Path | None, model: str, params: IndexParams, snapshot_ops: int = 5000,
                 expected_version: str = "") -> None:
        self.directory = directory
        self.model = model
        self.params = params
        self.snapshot_ops = snapshot_ops
        self.expected_version = expected_version
        self.binding: Binding | None = None
        self.index: VectorIndex | None = None
        self._write_lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._lock_file: IO[bytes] | None = None
        self._wal: IO[bytes] | None = None
        self._wal_generation = 1
        self._wal_ops = 0

    # -- opening -------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path | None, model: str, params: IndexParams, snapshot_ops: int = 5000,
             expected_version: str = "") -> PersistentIndex:
        store = cls(directory, model, params, snapshot_ops, expected_version)
        if directory is not None:
            try:
                store._open_directory(directory)
            except BaseException:
                store._unlock()
                raise
        return store

    def _open_directory(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(directory / LOCK, "ab")
        except OSError as error:
            raise SearchIndexError(f"cannot use search index directory {directory}: {error}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SearchIndexError(f"{directory} is in use by another gateway (each gateway needs its own "
                                   "GATEWAY_SEARCH_DIR)") from None
        start = time.perf_counter()
        snapshot = directory / SNAPSHOT
        if snapshot.exists():
            self._load_snapshot(snapshot)
        replayed = self._replay(directory)
        self._wal = open(directory / wal_name(self._wal_generation), "ab")
        LOG.info("search index loaded", extra={"fields": {
            "directory": str(directory), "products": len(self.index) if self.index else 0,
            "model": self.model, "model_version": self.binding.model_version if self.binding else "",
            "replayed_writes": replayed, "seconds": round(time.perf_counter() - start, 3)}})

    def _load_snapshot(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as archive:
                header = json.loads(archive["header"].tobytes())
                blobs = {name: archive[f"blob_{name}"] for name in header["blobs"]}
        except Exception as error:  # zipfile, numpy and json all raise their own types on a damaged file
            raise SearchIndexError(f"search index {path} is corrupt ({type(error).__name__}: {error}); "
                                   f"restore it from a backup or {REEMBED_HINT}") from None
        if header.get("format") != FORMAT or header.get("library") != LIBRARY:
            raise SearchIndexError(f"search index {path} has format {header.get('format')!r} of "
                                   f"{header.get('library')!r}; this gateway reads format {FORMAT} of {LIBRARY}")
        for name, digest in header["blobs"].items():
            if hashlib.sha256(blobs[name]).hexdigest() != digest:
                raise SearchIndexError(f"search index {path} is corrupt (checksum of {name} does not match); "
                                       f"{REEMBED_HINT}")
        binding = Binding(**header["binding"])
        self._check_binding(binding, path)
        params = IndexParams(**{**asdict(self.params), **header["graph"], "dim": binding.dim})
        try:
            self.index = VectorIndex.load(params, header["state"], blobs)
        except (KeyError, ValueError, RuntimeError) as error:
            raise SearchIndexError(f"search index {path} is inconsistent: {error}; {REEMBED_HINT}") from None
        self.params = params
        self.binding = binding
        self._wal_generation = int(header["wal_generation"])

    def _check_binding(self, binding: Binding, where: Path) -> None:
        if binding.model != self.model:
            raise SearchIndexError(f"search index {where} holds embeddings of model {binding.model!r}, but this "
                                   f"gateway searches with {self.model!r} (GATEWAY_SEARCH_MODEL); {REEMBED_HINT}")
        if self.expected_version and binding.model_version != self.expected_version:
            raise SearchIndexError(
                f"search index {where} holds embeddings of {binding.model} version {binding.model_version}, but "
                f"GATEWAY_SEARCH_MODEL_VERSION={self.expected_version}; {REEMBED_HINT}")
        if self.binding is not None and binding != self.binding:
            raise SearchIndexError(f"{where} disagrees with the snapshot: {binding} vs {self.binding}")

    def _replay(self, directory: Path) -> int:
        logs = sorted((p for p in directory.glob("wal-*.log")), key=lambda p: p.name)
        replayed = 0
        for path in logs:
            generation = int(path.stem.split("-")[1])
            if generation < self._wal_generation:
                path.unlink()  # already in the snapshot: a crash came between snapshot and clean-up
                continue
            data = path.read_bytes()
            lines = data.split(b"\n")
            complete, tail = lines[:-1], lines[-1]
            for number, line in enumerate(complete, 1):
                try:
                    record = decode_record(line)
                    self._apply(record)
                except SearchIndexError:
                    raise
                except Exception as error:
                    raise SearchIndexError(f"search index log {path} line {number} is corrupt ({error}); "
                                           f"{REEMBED_HINT}") from None
                replayed += 1
                self._wal_ops += 1
            if tail:
                if path != logs[-1]:
                    raise SearchIndexError(f"search index log {path} ends mid-record but is not the last log; "
                                           f"{REEMBED_HINT}")
                LOG.warning("dropping a torn last record of %s (%d bytes; a crash during a write)", path, len(tail))
                with open(path, "r+b") as f:
                    f.truncate(len(data) - len(tail))
            self._wal_generation = generation
        return replayed

    # -- applying writes -----------------------------------------------------------------------------------------
    def _apply(self, record: Mapping[str, Any]) -> bool:
        op = record["op"]
        if op == "bind":
            binding = Binding(record["model"], record["model_version"], int(record["dim"]))
            self._check_binding(binding, self.directory or Path("."))
            self._bind(binding)
            return False
        if self.index is None:
            raise ValueError(f"{op} before the index was bound to a model")
        if op == "put":
            product = Product(record["id"], record["label"], dict(record["metadata"]))
            return self.index.put(product, vector_from_text(record["vector"]))
        if op == "delete":
            self.index.delete(record["id"])
            return True
        raise ValueError(f"unknown operation {op!r}")

    def _bind(self, binding: Binding) -> None:
        self.binding = binding
        self.params = IndexParams(**{**asdict(self.params), "dim": binding.dim}).validate()
        if self.index is None:
            self.index = VectorIndex(self.params)

    def _log(self, record: Mapping[str, Any]) -> None:
        if self._wal is not None:
            self._wal.write(encode_record(record))
            self._wal.flush()
            self._wal_ops += 1

    def check_embedding(self, model_version: str, dim: int) -> None:
        """``BindingMismatch`` when an embedding of ``model_version`` with ``dim`` values does not fit."""
        binding = self.binding
        if binding is None:
            if self.expected_version and model_version != self.expected_version:
                raise BindingMismatch(f"Triton answered with {self.model} version {model_version}, but the index "
                                      f"is pinned to version {self.expected_version} (GATEWAY_SEARCH_MODEL_VERSION)")
            return
        if (binding.model_version, binding.dim) != (model_version, dim):
            raise BindingMismatch(
                f"the index holds embeddings of {binding.model} version {binding.model_version} ({binding.dim} "
                f"values), but this one came from version {model_version} ({dim} values); {REEMBED_HINT}")

    def put(self, product: Product, vector: np.ndarray, model_version: str) -> bool:
        """Log, then add or replace ``product``; binds an empty index to ``model_version`` first."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        with self._write_lock:
            self.check_embedding(model_version, vector.shape[0])
            if self.binding is None:
                binding = Binding(self.model, model_version, int(vector.shape[0]))
                self._log({"op": "bind", **asdict(binding)})
                self._bind(binding)
            assert self.index is not None
            self._log({"op": "put", "id": product.product_id, "label": product.label,
                       "metadata": dict(product.metadata), "vector": vector_to_text(vector)})
            return self.index.put(product, vector)

    def delete(self, product_id: str) -> Product:
        """Log, then remove; ``KeyError`` when the id is unknown (nothing is logged then)."""
        with self._write_lock:
            if self.index is None or self.index.get(product_id) is None:
                raise KeyError(product_id)
            self._log({"op": "delete", "id": product_id})
            return self.index.delete(product_id)

    def search(self, vector: np.ndarray, k: int, label: str = "") -> list[Hit]:
        return [] if self.index is None else self.index.search(vector, k, label)

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    @property
    def snapshot_due(self) -> bool:
        return self.directory is not None and self._wal_ops >= self.snapshot_ops

    # -- snapshots -----------------------------------------------------------------------------------------------
    def snapshot(self) -> bool:
        """Write the whole index to ``snapshot.npz`` and drop the WAL it covers; False if one is running."""
        if self.directory is None or not self._snapshot_lock.acquire(blocking=False):
            return False
        try:
            with self._write_lock:
                if self.index is None or self.binding is None or self._wal_ops == 0:
                    return False
                state, blobs = self.index.dump()
                binding, graph = self.binding, self.params
                assert self._wal is not None
                self._wal.close()
                self._wal_generation += 1
                self._wal = open(self.directory / wal_name(self._wal_generation), "ab")
                generation, self._wal_ops = self._wal_generation, 0
            start = time.perf_counter()
            header = {
                "format": FORMAT, "library": LIBRARY, "library_version": usearch.__version__,
                "binding": asdict(binding), "wal_generation": generation, "created_at": time.time(),
                "graph": {"dtype": graph.dtype, "connectivity": graph.connectivity},
                "state": state, "blobs": {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()},
            }
            arrays = {f"blob_{name}": np.frombuffer(blob, dtype=np.uint8) for name, blob in blobs.items()}
            arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
            final = self.directory / SNAPSHOT
            temporary = final.with_suffix(".tmp")
            with open(temporary, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, final)
            self._fsync_directory()
            for old in self.directory.glob("wal-*.log"):
                if int(old.stem.split("-")[1]) < generation:
                    old.unlink()
            LOG.info("search index snapshot written", extra={"fields": {
                "path": str(final), "products": len(state["products"]), "bytes": final.stat().st_size,
                "seconds": round(time.perf_counter() - start, 3)}})
            return True
        finally:
            self._snapshot_lock.release()

    def _fsync_directory(self) -> None:
        assert self.directory is not None
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Snapshot what the WAL holds, then release the directory."""
        if self.directory is not None:
            try:
                self.snapshot()
            finally:
                if self._wal is not None:
                    with contextlib.suppress(OSError):
                        self._wal.flush()
                        os.fsync(self._wal.fileno())
                    self._wal.close()
                    self._wal = None
                self._unlock()

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None
