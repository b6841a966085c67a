"""In-memory vector index of catalog products: usearch HNSW graphs, one global and one per category.

Vectors are L2-normalised, so inner product is cosine similarity and a match's
``score`` is in [-1, 1] (1 = same direction). A search runs exactly (brute
force) while the graph it would use holds fewer than ``exact_below`` products,
and through the HNSW graph above that. A category filter searches that
category's own graph, so a filtered search is as accurate as an unfiltered one
whatever the category's share of the catalog.

Every public method holds one lock: searches see either the state before a
write or after it, never half of it, from threads and from asyncio (through
``asyncio.to_thread``) alike.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from usearch.index import Index

DTYPES = ("f16", "f32")


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class IndexParams:
    """HNSW settings. ``dim``, ``dtype`` and ``connectivity`` are fixed once a graph exists."""

    dim: int
    dtype: str = "f32"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 64
    exact_below: int = 2000

    def validate(self) -> IndexParams:
        if self.dim < 1:
            raise ValueError(f"dim={self.dim} must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.connectivity < 2 or self.expansion_add < 1 or self.expansion_search < 1 or self.exact_below < 0:
            raise ValueError(f"bad HNSW settings: {self}")
        return self


@dataclass(frozen=True)
class Product:
    product_id: str
    label: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    product: Product
    score: float


def _serialise(graph: Index) -> bytes:
    buffer = graph.save()
    assert buffer is not None  # save() without a path returns the buffer
    return bytes(buffer)


class VectorIndex:
    """Products with one embedding each; ``put`` adds or replaces, ``delete`` removes, ``search`` ranks."""

    def __init__(self, params: IndexParams) -> None:
        self.params = params.validate()
        self._lock = threading.Lock()
        self._global = self._new_graph()
        self._by_label: dict[str, Index] = {}
        self._key_of: dict[str, int] = {}
        self._products: dict[int, Product] = {}
        self._next_key = 0

    def _new_graph(self) -> Index:
        p = self.params
        return Index(ndim=p.dim, metric="ip", dtype=p.dtype, connectivity=p.connectivity,
                     expansion_add=p.expansion_add, expansion_search=p.expansion_search, multi=False)

    def _check(self, vector: np.ndarray) -> np.ndarray:
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.params.dim:
            raise ValueError(f"vector has {vector.shape[0]} dimensions; this index holds {self.params.dim}")
        if not np.isfinite(vector).all():
            raise ValueError("vector has NaN or infinite components")
        return l2_normalise(vector)

    # -- reads ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._products)

    def get(self, product_id: str) -> Product | None:
        with self._lock:
            key = self._key_of.get(product_id)
            return None if key is None else self._products[key]

    def label_counts(self) -> dict[str, int]:
        with self._lock:
            return {label: len(graph) for label, graph in self._by_label.items()}

    def search(self, vector: np.ndarray, k: int, label: str = "") -> list[Hit]:
        """The ``k`` most similar products, best first; ``label`` restricts them to that category."""
        query = self._check(vector)
        with self._lock:
            graph = self._by_label.get(label) if label else self._global
            if graph is None or len(graph) == 0 or k <= 0:
                return []
            exact = len(graph) < self.params.exact_below
            # HNSW keeps max(ef, k) candidates; widen ef for large k so recall does not drop.
            if not exact and k > graph.expansion_search:
                graph.expansion_search = k  # type: ignore[misc]  # usearch declares the setter apart
            matches = graph.search(query, k, exact=exact, threads=1)
            graph.expansion_search = self.params.expansion_search  # type: ignore[misc]
            return [Hit(self._products[int(key)], float(1.0 - distance))
                    for key, distance in zip(matches.keys, matches.distances, strict=True)]

    # -- writes --------------------------------------------------------------------------------------------------
    def put(self, product: Product, vector: np.ndarray) -> bool:
        """Add ``product`` or replace the one with the same id; True when it replaced one."""
        unit = self._check(vector)
        with self._lock:
            replaced = product.product_id in self._key_of
            if replaced:
                self._remove(product.product_id)
            key = self._next_key
            self._next_key += 1
            self._global.add(key, unit, threads=1)
            graph = self._by_label.get(product.label)
            if graph is None:
                graph = self._by_label[product.label] = self._new_graph()
            graph.add(key, unit, threads=1)
            self._key_of[product.product_id] = key
            self._products[key] = product
            return replaced

    def delete(self, product_id: str) -> Product:
        """Remove and return the product; ``KeyError`` when the id is unknown."""
        with self._lock:
            if product_id not in self._key_of:
                raise KeyError(product_id)
            return self._remove(product_id)

    def _remove(self, product_id: str) -> Product:
        key = self._key_of.pop(product_id)
        product = self._products.pop(key)
        self._global.remove(key)
        graph = self._by_label[product.label]
        graph.remove(key)
        if len(graph) == 0:
            del self._by_label[product.label]
        return product

    # -- persistence ---------------------------------------------------------------------------------------------
    def dump(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """A consistent copy: JSON-able state and the serialised graphs (``global``, ``label-<i>``)."""
        with self._lock:
            labels = sorted(self._by_label)
            state = {
                "next_key": self._next_key,
                "labels": labels,
                "products": [[key, p.product_id, p.label, dict(p.metadata)] for key, p in self._products.items()],
            }
            blobs = {"global": _serialise(self._global)}
            blobs.update({f"label-{i}": _serialise(self._by_label[label]) for i, label in enumerate(labels)})
        return state, blobs

    @classmethod
    def load(cls, params: IndexParams, state: Mapping[str, Any], blobs: Mapping[str, Any]) -> VectorIndex:
        """Rebuild from :meth:`dump` output; ``ValueError`` when the parts do not agree."""
        index = cls(params)
        index._global = index._restore(blobs["global"])
        for i, label in enumerate(state["labels"]):
            index._by_label[label] = index._restore(blobs[f"label-{i}"])
        for key, product_id, label, metadata in state["products"]:
            index._key_of[product_id] = int(key)
            index._products[int(key)] = Product(product_id, label, dict(metadata))
        index._next_key = int(state["next_key"])
        index._verify()
        return index

    def _restore(self, blob: Any) -> Index:
        graph = self._new_graph()
        graph.load(blob)
        if graph.ndim != self.params.dim:
            raise ValueError(f"a stored graph has {graph.ndim} dimensions; the index header says {self.params.dim}")
        return graph

    def _verify(self) -> None:
        keys = set(self._products)
        if len(self._global) != len(keys) or len(self._key_of) != len(keys):
            raise ValueError(f"{len(keys)} products but {len(self._global)} vectors in the global graph")
        present = np.asarray(self._global.contains(np.array(sorted(keys)))) if keys else np.array([True])
        if keys and (max(keys) >= self._next_key or not present.all()):
            raise ValueError("product keys and graph keys disagree")
        by_label: dict[str, int] = {}
        for product in self._products.values():
            by_label[product.label] = by_label.get(product.label, 0) + 1
        if by_label != {label: len(graph) for label, graph in self._by_label.items()}:
            raise ValueError("category graphs disagree with the products' categories")

    def products(self) -> Iterable[Product]:
        with self._lock:
            return list(self._products.values())
