"""Classification metrics (pure numpy): top-k accuracy, confusion matrix, per-class precision / recall / F1."""
from __future__ import annotations

import numpy as np


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the ``k`` highest scores."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``matrix[true, predicted]`` counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where undefined)."""
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def classification_report(scores: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] | list[str]) -> dict:
    """Everything the model card shows, JSON-serialisable."""
    predictions = scores.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, len(classes))
    stats = per_class(matrix)
    return {
        "count": int(len(labels)),
        "top1": top_k_accuracy(scores, labels, 1),
        "top5": top_k_accuracy(scores, labels, 5),
        "macro_precision": float(stats["precision"].mean()),
        "macro_recall": float(stats["recall"].mean()),
        "macro_f1": float(stats["f1"].mean()),
        "per_class": [
            {"class": name, "precision": float(stats["precision"][i]), "recall": float(stats["recall"][i]),
             "f1": float(stats["f1"][i]), "support": int(stats["support"][i])}
            for i, name in enumerate(classes)
        ],
        "confusion_matrix": matrix.tolist(),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis: training's one implementation. The served copies
    (``postprocess_softmax`` and the fused combine step, self-contained Triton models) are tested against it."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return result
