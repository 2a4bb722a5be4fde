"""Calibration from normal images only, in one place: which normal images are held out, the
decision threshold from their scores, and the heatmap colour range from their maps.

Every detector scores normal images it did not learn from and hands the scores and maps to
:func:`calibrate`; nothing else in defectlens computes a threshold or a map range.

Threshold rule: the held-out normal scores give the score a good part gets. The threshold is the
score that the next normal part exceeds with probability ``fpr`` (the false-alarm rate the user
accepts): the upper bound of a Gaussian prediction interval, mean + t(n-1) · std · sqrt(1 + 1/n),
which widens honestly when only a few scores are known (Student's t instead of the normal
quantile), or the empirical quantile when there are enough scores to resolve it and the tail is
heavier than Gaussian. Whichever is larger is used.

Fewer than three scores give no threshold. Two are not two independent draws in practice: with
two good images, leave-one-out scores each against the other and the pair comes out nearly
equal, so the spread looks tiny; on BSData 2-shot, thresholds from such pairs flagged 38 % (PaDiM)
and 51 % (SPADE) of the good test images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

DEFAULT_FPR = 0.01
MIN_SCORES = 3
#: Up to this many normal images, methods that can re-fit cheaply hold each out in turn.
LEAVE_ONE_OUT_MAX = 10
#: Otherwise they hold out this many disjoint folds in turn, so every normal image gets a
#: held-out score: with one fold of a fifth, 85 of BSData's 426 scores could not resolve a 1 %
#: quantile and the threshold fell back to their maximum (test FPR 0.007, TPR 0.49 for patchknn;
#: all 426: FPR 0.011, TPR 0.69).
CROSS_FOLDS = 5
#: Methods trained once hold out one fold of this share of the normal images.
HELD_OUT_FRACTION = 0.2
#: Heatmaps are red this far beyond the most anomalous held-out normal pixel.
MAP_HEADROOM = 1.25


@dataclass(frozen=True)
class Calibration:
    """What the held-out normal images tell: their scores, the threshold, the map colour range."""

    normal_scores: np.ndarray | None = None
    threshold: float | None = None
    map_range: tuple[float, float] | None = None


NONE = Calibration()


def refit_folds(count: int, seed: int) -> list[np.ndarray]:
    """Folds of normal-image indices to hold out, for methods cheap to re-fit: each image alone
    up to ``LEAVE_ONE_OUT_MAX`` images, else ``CROSS_FOLDS`` random disjoint folds that together
    hold out every image once. One image gives no fold (nothing would be left to fit on)."""
    if count < 2:
        return []
    order = np.random.default_rng(seed).permutation(count)
    if count <= LEAVE_ONE_OUT_MAX:
        return [order[i : i + 1] for i in range(count)]
    return [np.sort(fold) for fold in np.array_split(order, CROSS_FOLDS)]


def held_out_split(count: int, seed: int, most: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices for methods trained once: ``HELD_OUT_FRACTION`` of the images
    (at most ``most``) is held out when that is at least ``MIN_SCORES`` of them (13 images or
    more); below that every image trains, since fewer held-out scores could not set a threshold."""
    order = np.random.default_rng(seed).permutation(count)
    held = min(round(HELD_OUT_FRACTION * count), most if most is not None else count)
    if held < MIN_SCORES:
        held = 0
    return np.sort(order[held:]), np.sort(order[:held])


def threshold_from_normal_scores(scores, fpr: float = DEFAULT_FPR) -> float | None:
    """The score the next normal image exceeds with probability ``fpr`` (see the module doc)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be between 0 and 1, not {fpr}")
    if scores.size < MIN_SCORES:
        return None
    # Student's t quantile from scipy.special, here and not at the top: scipy.stats (t.ppf, the
    # same numbers) costs about 1 s to import, a twentieth of the default's whole fit.
    from scipy.special import stdtrit

    count = scores.size
    gaussian = scores.mean() + stdtrit(count - 1, 1.0 - fpr) * scores.std(ddof=1) * np.sqrt(1.0 + 1.0 / count)
    empirical = np.quantile(scores, 1.0 - fpr) if count * fpr >= 1.0 else scores.max()
    return float(max(gaussian, empirical))


def heatmap_range(normal_map_values: Iterable, peaks=None) -> tuple[float, float] | None:
    """(low, high) for heatmap colours: blue at a typical normal pixel (the median), red beyond
    the most anomalous normal pixel. Takes maps or arrays of map values of normal images, and
    ``peaks``: the largest value of each normal map that is not given whole (it counts for the
    red end only; a median needs the whole maps of just a sample of the images)."""
    arrays = [np.asarray(values, dtype=np.float64).ravel() for values in normal_map_values]
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    peaks = np.zeros(0) if peaks is None else np.asarray(peaks, dtype=np.float64).ravel()
    peaks = peaks[np.isfinite(peaks)]
    return float(np.median(values)), float(max(values.max(), peaks.max(initial=-np.inf))) * MAP_HEADROOM


def calibrate(normal_scores, normal_maps: Iterable | None = None, fpr: float = DEFAULT_FPR,
              map_peaks=None) -> Calibration:
    """The calibration given held-out normal scores (None or empty: no threshold), their maps
    and the peaks of the maps not given whole (see ``heatmap_range``)."""
    scores = None if normal_scores is None else np.asarray(normal_scores, dtype=np.float64).ravel()
    if scores is not None and scores.size == 0:
        scores = None
    threshold = None if scores is None else threshold_from_normal_scores(scores, fpr)
    return Calibration(scores, threshold, None if normal_maps is None else heatmap_range(normal_maps, map_peaks))


# Label-free threshold for transductive methods (musc) that see no normal image: the score a
# normal image exceeds with about 1 % probability if normal scores were Gaussian (z of the 99th
# percentile); MAD · 1.4826 estimates a Gaussian's standard deviation.
BATCH_Z = 2.326
MAD_TO_STD = 1.4826


def batch_threshold(scores) -> float | None:
    """Decision threshold from the unlabelled scores of one batch: median + z · robust std.

    Median and median absolute deviation stay with the normal images while defective ones are a
    minority; with more defective images the threshold rises and flags fewer of them.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < MIN_SCORES:
        return None
    median = float(np.median(scores))
    return median + BATCH_Z * MAD_TO_STD * float(np.median(np.abs(scores - median)))
