import numpy as np
import pytest
from scipy.stats import norm

from defectlens.engine.threshold import threshold_from_normal_scores


def test_gaussian_tail_for_few_scores():
    scores = [1.0, 2.0, 3.0]
    assert threshold_from_normal_scores(scores, fpr=0.01) == pytest.approx(2.0 + norm.ppf(0.99) * 1.0)


def test_empirical_quantile_when_it_is_higher():
    rng = np.random.default_rng(0)
    heavy_tail = np.concatenate([rng.normal(0, 1, 990), np.full(10, 50.0)])
    threshold = threshold_from_normal_scores(heavy_tail, fpr=0.005)
    assert threshold == pytest.approx(np.quantile(heavy_tail, 0.995))
    assert (heavy_tail > threshold).mean() <= 0.005


def test_needs_two_scores_and_a_valid_rate():
    assert threshold_from_normal_scores([1.0]) is None
    with pytest.raises(ValueError):
        threshold_from_normal_scores([1.0, 2.0], fpr=1.5)
