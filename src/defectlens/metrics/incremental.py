"""Metrics of incremental (continual) anomaly detection, as the IUF write-up (ECCV 2024) defines
them, on a matrix A[b, i] = AUROC on object i after training step b (image- or pixel-level).

Rows are training steps (0 … N-1 here, 1 … N in the write-up), columns objects. An object not yet
learned at step b has A[b, i] = NaN. With the last step N:

- ACC = mean over every object i of A[N, i]: what the final model achieves on all objects.
  The write-up prints ``1/N Σ_{i=1}^{N-1} A_{N,i}``; read literally, a perfect detector would
  score (N-1)/N, so the upper limit is a transcription slip for N (the usual average accuracy of
  continual learning). We average every object's final AUROC.
- FM = mean over the objects learned before the last step of max_{b < N} (A[b, i] - A[N, i]):
  how much of its best earlier AUROC each old object lost by the end. Objects first learned in
  the last step have no earlier value and are left out (the write-up's i ≤ N-1, b ≤ N-1).

Both are returned in the matrix's own units (AUROC in [0, 1]); multiply by 100 for points.
"""

from __future__ import annotations

import numpy as np


def _matrix(accuracy) -> np.ndarray:
    matrix = np.asarray(accuracy, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"the accuracy matrix must be steps × objects (2-D, non-empty), not shape {matrix.shape}")
    if np.isnan(matrix[-1]).any():
        missing = np.flatnonzero(np.isnan(matrix[-1])).tolist()
        raise ValueError(f"objects {missing} have no AUROC after the last step: every object must be learned by then")
    return matrix


def average_accuracy(accuracy) -> float:
    """ACC: the mean of the last row (every object's AUROC after the last step)."""
    return float(_matrix(accuracy)[-1].mean())


def forgetting_measure(accuracy) -> float:
    """FM: mean over objects learned before the last step of the largest drop from an earlier
    step's AUROC to the last one (negative when the final model is better on every old object).
    NaN when there is a single step (nothing can be forgotten)."""
    matrix = _matrix(accuracy)
    if matrix.shape[0] < 2:
        return float("nan")
    earlier = matrix[:-1]
    old = ~np.isnan(earlier).all(axis=0)
    if not old.any():
        return float("nan")
    drops = np.nanmax(earlier[:, old], axis=0) - matrix[-1, old]
    return float(drops.mean())


def first_steps(accuracy) -> np.ndarray:
    """The step at which each object was learned (its first non-NaN row)."""
    matrix = _matrix(accuracy)
    return np.argmax(~np.isnan(matrix), axis=0)
