import numpy as np
import pytest
from scipy.stats import t as student_t

from defectlens.engine.threshold import threshold_from_normal_scores


def test_prediction_interval_for_few_scores():
    scores = [1.0, 2.0, 3.0]  # mean 2, sample std 1
    expected = 2.0 + student_t.ppf(0.99, 2) * 1.0 * np.sqrt(1 + 1 / 3)
    assert threshold_from_normal_scores(scores, fpr=0.01) == pytest.approx(expected)


def test_false_alarm_rate_holds_on_average_for_gaussian_normals():
    """The point of a prediction interval: over many draws of k held-out scores, the next
    normal score exceeds the threshold at the promised rate (here 5 %), even for k = 3."""
    rng = np.random.default_rng(1)
    exceed = [rng.normal() > threshold_from_normal_scores(rng.normal(size=3), fpr=0.05) for _ in range(20000)]
    assert np.mean(exceed) == pytest.approx(0.05, abs=0.006)


def test_empirical_quantile_when_it_is_higher():
    rng = np.random.default_rng(0)
    heavy_tail = np.concatenate([rng.normal(0, 1, 990), np.full(10, 50.0)])
    threshold = threshold_from_normal_scores(heavy_tail, fpr=0.005)
    assert threshold == pytest.approx(np.quantile(heavy_tail, 0.995))
    assert (heavy_tail > threshold).mean() <= 0.005


def test_needs_three_scores_and_a_valid_rate():
    assert threshold_from_normal_scores([1.0]) is None
    assert threshold_from_normal_scores([1.0, 1.01]) is None  # two nearly equal leave-one-out scores
    with pytest.raises(ValueError):
        threshold_from_normal_scores([1.0, 2.0], fpr=1.5)
