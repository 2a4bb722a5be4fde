"""Pixel-level metrics: pixel AUROC and AU-PRO (MVTec AD's per-region overlap curve).

Both are exact (every distinct score is a threshold) and stream over the images, so hundreds
of full-resolution maps never get concatenated. They share one idea: a ROC curve in which each
anomalous pixel carries a weight. With weight 1 the true-positive axis is the pixel TPR; with
weight 1/(size of its ground-truth region) it is the mean per-region overlap (PRO), because
PRO(t) = mean over regions of (pixels >= t in the region / region size), which is a weighted
count of anomalous pixels at or above t.

Only the anomalous pixels (few, in inspection data) are held in memory; normal pixels are
counted image by image into bins between consecutive distinct anomalous scores. Between two
such scores the true-positive axis is flat, so those counts give every vertex of the curve.

Masks: bool-like H×W arrays (non-zero = defect), or None for an all-normal image. Maps: float
H×W arrays of the same shape, higher = more anomalous; images may differ in size.
"""

from __future__ import annotations

import cv2
import numpy as np


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels of all images; nan if a class is missing."""
    curve = _roc_curve(_pairs(masks, maps), per_region=False)
    return float("nan") if curve is None else float(np.trapezoid(curve[1], curve[0]))


def au_pro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the PRO-vs-FPR curve from FPR 0 to ``fpr_limit``, divided by ``fpr_limit``.

    Regions are the 8-connected components of each ground-truth mask; FPR counts pixels
    outside every mask, good images included. A perfect map scores 1. nan when there is no
    anomalous region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], not {fpr_limit}")
    curve = _roc_curve(_pairs(masks, maps), per_region=True)
    return float("nan") if curve is None else _area_up_to(*curve, fpr_limit) / fpr_limit


def _pairs(masks, maps) -> list[tuple[np.ndarray | None, np.ndarray]]:
    """Pair masks with maps, checking counts and shapes up front (before any long pass)."""
    masks, maps = list(masks), list(maps)
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    pairs = []
    for index, (mask, score_map) in enumerate(zip(masks, maps)):
        score_map = np.asarray(score_map)
        if score_map.ndim != 2:
            raise ValueError(f"map {index} has shape {score_map.shape}, expected H×W")
        if mask is not None:
            mask = np.asarray(mask) != 0
            if mask.shape != score_map.shape:
                raise ValueError(f"mask {index} is {mask.shape} but its map is {score_map.shape}")
        pairs.append((mask, score_map))
    return pairs


def _scores(score_map: np.ndarray) -> np.ndarray:
    # float64 so float32 maps compare exactly against the collected anomalous scores.
    scores = np.asarray(score_map, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("anomaly map contains NaN")
    return scores


def _anomalous_pixels(pairs, per_region: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scores of all defect pixels and their weights (1, or 1 / their region's size)."""
    scores, weights = [], []
    for mask, score_map in pairs:
        if mask is None or not mask.any():
            continue
        scores.append(_scores(score_map)[mask])
        if per_region:
            _, regions = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            region_of_pixel = regions[mask]
            weights.append(1.0 / np.bincount(region_of_pixel)[region_of_pixel])
        else:
            weights.append(np.ones(scores[-1].size))
    if not scores:
        return np.empty(0), np.empty(0)
    return np.concatenate(scores), np.concatenate(weights)


def _normal_counts(pairs, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal pixels strictly between consecutive ``values`` (m + 1 bins, lowest first) and
    equal to each value (m bins), counted one image at a time."""
    m = values.size
    counts = np.zeros(2 * m + 1, dtype=np.int64)
    for mask, score_map in pairs:
        scores = _scores(score_map)
        # Sorted queries keep the binary search in cache: several times faster overall.
        # np.sort copies: a float64 map arrives here as the caller's own array.
        normal = np.sort(scores.ravel() if mask is None else scores[~mask])
        slot = np.searchsorted(values, normal)
        tied = values[np.minimum(slot, m - 1)] == normal
        counts += np.bincount(2 * slot + tied, minlength=2 * m + 1)
    return counts[0::2], counts[1::2]


def _roc_curve(pairs, per_region: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Vertices (FPR, weighted TPR) of the curve through every distinct threshold, from the
    highest threshold down; None when either class is empty."""
    return weighted_curve(*_anomalous_pixels(pairs, per_region), pairs)


def weighted_curve(scores: np.ndarray, weights: np.ndarray, normal_pairs,
                   total_weight: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The curve for anomalous pixel ``scores`` carrying ``weights``, against the normal pixels
    of ``normal_pairs`` ((mask or None, map): pixels outside the mask). The true-positive axis is
    the weight at or above the threshold over ``total_weight`` (default: all the weight)."""
    if scores.size == 0:
        return None
    values, inverse = np.unique(scores, return_inverse=True)
    weight_at = np.bincount(inverse, weights=weights)
    between, tied = _normal_counts(normal_pairs, values)
    n_normal = between.sum() + tied.sum()
    if n_normal == 0:
        return None
    # Lowering the threshold past each distinct anomalous score (highest first) first adds
    # the normals above it (flat step), then the pixels equal to it (a diagonal when normals
    # tie with it); the normals below the lowest anomalous score close the curve at (1, 1).
    m = values.size
    fp_steps = np.empty(2 * m + 1)
    fp_steps[0:2 * m:2] = between[:0:-1]
    fp_steps[1:2 * m:2] = tied[::-1]
    fp_steps[2 * m] = between[0]
    tp_steps = np.zeros(2 * m + 1)
    tp_steps[1:2 * m:2] = weight_at[::-1]
    fp = np.concatenate([[0.0], np.cumsum(fp_steps)])
    tp = np.concatenate([[0.0], np.cumsum(tp_steps)])
    return fp / n_normal, tp / (tp[-1] if total_weight is None else total_weight)


def _area_up_to(fpr: np.ndarray, tpr: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the curve from FPR 0 to ``limit``, interpolating at ``limit``."""
    inside = int(np.searchsorted(fpr, limit, side="right"))
    if inside == fpr.size:
        return float(np.trapezoid(tpr, fpr))
    x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], tpr[inside - 1], tpr[inside]
    tpr_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    return float(np.trapezoid(np.append(tpr[:inside], tpr_at_limit),
                              np.append(fpr[:inside], limit)))
