"""Image-level metrics: AUROC, AUPR (average precision) and F1-max.

Labels are truthy for anomalous images; scores are higher for more anomalous images. Every
metric returns nan instead of raising when only one class is present, because per-defect-type
breakdowns and small test splits hit that case routinely.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)


def _prepare(labels, scores) -> tuple[np.ndarray, np.ndarray] | None:
    """Labels as bool and scores as float64, or None when the metric is undefined."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if labels.all() or not labels.any():
        return None
    return labels, scores


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve; ties count half."""
    prepared = _prepare(labels, scores)
    return float("nan") if prepared is None else float(roc_auc_score(*prepared))


def image_aupr(labels, scores) -> float:
    """Average precision: area under the precision-recall curve, as a step sum."""
    prepared = _prepare(labels, scores)
    return float("nan") if prepared is None else float(average_precision_score(*prepared))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds, and a threshold that reaches it.

    The threshold sits halfway between the lowest score called anomalous and the next lower
    score, so ``scores > threshold`` reproduces the F1 (the ``Prediction.labels`` convention)
    and leaves a margin on both sides rather than sitting on a training score.
    """
    prepared = _prepare(labels, scores)
    if prepared is None:
        return float("nan"), float("nan")
    labels, scores = prepared
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), _threshold_below(scores, thresholds[best])


def _threshold_below(scores: np.ndarray, lowest_anomalous: float) -> float:
    """A value t with ``scores > t`` exactly equal to ``scores >= lowest_anomalous``."""
    below = scores[scores < lowest_anomalous]
    if below.size == 0:
        return float(np.nextafter(lowest_anomalous, -np.inf))
    highest_normal = below.max()
    middle = highest_normal + (lowest_anomalous - highest_normal) / 2
    # Adjacent floats: the midpoint can round up onto the anomalous score.
    return float(middle if middle < lowest_anomalous else highest_normal)
