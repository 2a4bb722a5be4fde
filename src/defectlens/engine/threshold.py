"""Decision thresholds from normal images only: no defect samples needed.

The held-out normal scores (images the model did not see while fitting) give the score a good
part gets. The threshold is the score that a normal part exceeds with probability ``fpr`` (the
false-alarm rate the user accepts): the empirical quantile when there are enough scores to
resolve it, otherwise a Gaussian tail fitted to them. Whichever of the two is larger is used,
because a handful of scores underestimates the tail.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

DEFAULT_FPR = 0.01


def threshold_from_normal_scores(scores, fpr: float = DEFAULT_FPR) -> float | None:
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be between 0 and 1, not {fpr}")
    if scores.size < 2:
        return None
    gaussian = scores.mean() + norm.ppf(1.0 - fpr) * scores.std(ddof=1)
    empirical = np.quantile(scores, 1.0 - fpr) if scores.size * fpr >= 1.0 else scores.max()
    return float(max(gaussian, empirical))
