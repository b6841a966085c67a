"""The vector index on its own: CRUD, category graphs, ANN recall against exact search, concurrency."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from services.gateway.search.index import IndexParams, Product, VectorIndex, l2_normalise


def clustered(count: int, dim: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around ``clusters`` centres (like embeddings of a few product categories)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, count)
    vectors = centres[labels] + 0.8 * rng.standard_normal((count, dim)).astype(np.float32)
    return l2_normalise(vectors), labels


def exact(catalog: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return np.argsort(-(catalog @ query), kind="stable")[:k].tolist()


def filled(vectors: np.ndarray, labels: np.ndarray, **params: int) -> VectorIndex:
    index = VectorIndex(IndexParams(dim=vectors.shape[1], **params))  # type: ignore[arg-type]
    for i, vector in enumerate(vectors):
        index.put(Product(str(i), f"c{labels[i]}", {"row": str(i)}), vector)
    return index


def ids(hits) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(hit.product.product_id) for hit in hits]


def test_put_search_replace_delete() -> None:
    vectors, labels = clustered(300, 32, 3)
    index = filled(vectors, labels)
    assert len(index) == 300
    hits = index.search(vectors[7], 5)
    assert hits[0].product.product_id == "7" and hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert hits[0].product.metadata == {"row": "7"}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    # Same id again replaces the vector, label and metadata; the count does not change.
    assert index.put(Product("7", "other", {"v": "2"}), vectors[8]) is True
    assert len(index) == 300
    assert index.get("7") == Product("7", "other", {"v": "2"})
    assert "7" in {h.product.product_id for h in index.search(vectors[8], 2)}
    assert index.search(vectors[7], 1)[0].product.product_id != "7"
    assert [h.product.product_id for h in index.search(vectors[8], 5, "other")] == ["7"]

    deleted = index.delete("7")
    assert deleted.label == "other" and len(index) == 299
    assert index.search(vectors[8], 5, "other") == []
    assert "other" not in index.label_counts()
    with pytest.raises(KeyError):
        index.delete("7")
    with pytest.raises(KeyError):
        index.delete("never-indexed")
    with pytest.raises(ValueError, match="dimensions"):
        index.put(Product("x", "c0"), np.ones(16, dtype=np.float32))


def test_small_catalog_search_is_exact_and_k_is_capped() -> None:
    vectors, labels = clustered(150, 48, 4, seed=1)
    index = filled(vectors, labels, exact_below=1000)
    for row in range(0, 150, 15):
        assert ids(index.search(vectors[row], 10)) == exact(vectors, vectors[row], 10)
    assert len(index.search(vectors[0], 500)) == 150
    assert index.search(vectors[0], 10, "no-such-category") == []


def test_ann_recall_at_10_against_exact() -> None:
    everything, all_labels = clustered(3200, 128, 10, seed=2)
    vectors, labels, queries = everything[:3000], all_labels[:3000], everything[3000:]  # queries: same clusters
    index = filled(vectors, labels, exact_below=0)  # always the HNSW graph
    hits = sum(len(set(ids(index.search(q, 10))) & set(exact(vectors, q, 10))) for q in queries)
    recall = hits / (10 * len(queries))
    assert recall >= 0.98, recall


def test_category_search_matches_exact_within_the_category() -> None:
    vectors, labels = clustered(2000, 64, 5, seed=4)
    index = filled(vectors, labels, exact_below=0)
    members = np.flatnonzero(labels == 2)
    hits = 0
    for q in vectors[:100]:
        found = index.search(q, 10, "c2")
        assert {h.product.label for h in found} == {"c2"}
        hits += len(set(ids(found)) & set(members[exact(vectors[members], q, 10)].tolist()))
    assert hits / 1000 >= 0.98


def test_searches_stay_consistent_during_writes() -> None:
    """Readers never see a half-applied write, an unknown id or a duplicate, while a writer churns the index."""
    vectors, labels = clustered(600, 64, 4, seed=5)
    index = filled(vectors[:400], labels[:400], exact_below=0)
    stable = list(range(0, 400, 7))  # never touched by the writer
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        rng = np.random.default_rng(6)
        while not stop.is_set():
            row = int(rng.integers(400, 600))
            if index.get(str(row)) is not None and rng.random() < 0.4:
                index.delete(str(row))
            else:
                index.put(Product(str(row), f"c{labels[row]}", {"row": str(row)}), vectors[int(rng.integers(400, 600))])

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            row = stable[int(rng.integers(0, len(stable)))]
            label = f"c{labels[row]}" if rng.random() < 0.5 else ""
            hits = index.search(vectors[row], 10, label)
            found = [h.product.product_id for h in hits]
            if found[0] != str(row) or hits[0].score < 0.99:
                errors.append(f"query {row}: top hit {found[0]} {hits[0].score}")
            if len(set(found)) != len(found):
                errors.append(f"query {row}: duplicates {found}")
            if label and any(h.product.label != label for h in hits):
                errors.append(f"query {row}: category filter leaked")
            if any(int(i) >= 600 for i in found):
                errors.append(f"unknown id in {found}")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(timeout=120)
    stop.set()
    threads[0].join(timeout=30)
    assert not errors, errors[:5]
    counts = index.label_counts()
    assert sum(counts.values()) == len(index)
