"""What a threshold would do, and whether recent scores still look like the model's normal ones.

The dashboard's threshold view and drift panel are drawn from these numbers; the API returns them
so scripts see the same figures as the operator.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import ks_2samp

#: Fewer recent scores than this say nothing about drift.
MIN_DRIFT_SAMPLES = 20
DRIFT_P_VALUE = 0.01


def _rate(scores: np.ndarray, threshold: float) -> float | None:
    return float(np.mean(scores > threshold)) if scores.size else None


def histograms(sets: dict[str, np.ndarray], bins: int, include: list[float]) -> dict:
    """Counts of every set over one shared set of bin edges spanning all of them (and ``include``)."""
    values = np.concatenate([s for s in sets.values() if s.size] + [np.asarray(include, float)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"edges": [], **{name: [] for name in sets}}
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    margin = (high - low) * 0.02
    edges = np.linspace(low - margin, high + margin, bins + 1)
    return {"edges": edges.tolist(), **{name: np.histogram(s, edges)[0].tolist() for name, s in sets.items()}}


def at_threshold(threshold: float, normal: np.ndarray, recent: np.ndarray, defects: np.ndarray,
                 goods: np.ndarray) -> dict:
    """Expected false-alarm rate (held-out normal scores above the threshold), detection rate on
    operator-confirmed defects, and what the threshold would have flagged in the recent history."""
    return {
        "threshold": threshold,
        "false_alarm_rate": _rate(normal, threshold),
        "detection_rate": _rate(defects, threshold),
        "confirmed_defects": int(defects.size),
        "confirmed_good": int(goods.size),
        "confirmed_good_flagged": int(np.sum(goods > threshold)),
        "confirmed_defects_missed": int(np.sum(defects <= threshold)),
        "recent": int(recent.size),
        "recent_flagged": int(np.sum(recent > threshold)),
    }


def drift(recent: np.ndarray, normal: np.ndarray) -> dict:
    """Two-sample Kolmogorov-Smirnov test of recent scores against held-out normal scores, and the
    shift of their medians in units of the normal scores' spread."""
    if normal.size < 3:
        return {"status": "unknown", "reason": "the model has fewer than 3 held-out normal scores", "recent": int(recent.size)}
    if recent.size < MIN_DRIFT_SAMPLES:
        return {"status": "unknown", "reason": f"fewer than {MIN_DRIFT_SAMPLES} recent inspections",
                "recent": int(recent.size)}
    test = ks_2samp(recent, normal)
    spread = float(np.std(normal)) or 1.0
    shift = (float(np.median(recent)) - float(np.median(normal))) / spread
    drifted = test.pvalue < DRIFT_P_VALUE
    return {
        "status": "drift" if drifted else "ok",
        "ks_statistic": float(test.statistic),
        "p_value": float(test.pvalue),
        "median_shift_sd": shift,
        "recent": int(recent.size),
        "reason": (f"recent scores differ from the held-out normal scores (KS p = {test.pvalue:.2g}); median moved "
                   f"{shift:+.1f} SD. If the defect rate has not risen, lighting, camera or parts may have changed: "
                   "review and consider re-fitting on confirmed good images") if drifted else
                  f"recent scores are consistent with the held-out normal scores (KS p = {test.pvalue:.2g})",
    }
