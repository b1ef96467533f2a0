"""Classification metrics of the downstream tasks (pure; no torch, no Ray)."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    _check(preds, labels)
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (as scikit-learn's
    ``f1_score(average="macro")``); a class with no true and no predicted example is not counted."""
    _check(preds, labels)
    scores = []
    for c in sorted(set(labels) | set(preds)):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def micro_f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Single-label micro-F1: every wrong prediction is one false positive and one false negative, so
    it equals accuracy (ChemProt's customary metric)."""
    return accuracy(preds, labels)


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1, "micro_f1": micro_f1}


def score(metric: str, preds: Sequence[int], labels: Sequence[int]) -> float:
    return METRICS[metric](preds, labels)


def majority_baseline(metric: str, train_labels: Sequence[int], labels: Sequence[int]) -> float:
    """The metric of always predicting the training set's most frequent label."""
    top = max(sorted(set(train_labels)), key=list(train_labels).count)
    return score(metric, [top] * len(labels), labels)


def _check(preds: Sequence[int], labels: Sequence[int]) -> None:
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels, and at least one (got {len(preds)} and "
                         f"{len(labels)})")
