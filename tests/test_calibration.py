import numpy as np
import pytest
from scipy.stats import t as student_t

from defectlens.models.calibration import (
    MIN_SCORES,
    calibrate,
    heatmap_range,
    held_out_split,
    refit_folds,
    threshold_from_normal_scores,
)


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


def test_refit_folds_leave_one_out_then_five_folds_that_hold_out_every_image_once():
    assert refit_folds(1, 0) == []
    folds = refit_folds(7, 3)
    assert sorted(int(f[0]) for f in folds) == list(range(7)) and all(len(f) == 1 for f in folds)
    folds = refit_folds(53, 3)
    assert len(folds) == 5 and sorted(len(f) for f in folds) == [10, 10, 11, 11, 11]
    assert sorted(np.concatenate(folds).tolist()) == list(range(53))
    assert not np.array_equal(np.concatenate(folds), np.arange(53))  # random, not the first images first


def test_held_out_split_holds_out_only_what_can_set_a_threshold():
    for count in (1, 5, 12):
        train, held = held_out_split(count, 0)
        assert len(held) == 0 and sorted(train.tolist()) == list(range(count))
    train, held = held_out_split(13, 0)
    assert len(held) == MIN_SCORES and set(train.tolist()) | set(held.tolist()) == set(range(13))
    assert not set(train.tolist()) & set(held.tolist())
    assert len(held_out_split(1000, 0, most=40)[1]) == 40


def test_heatmap_range_is_median_to_headroom_above_the_worst_normal_pixel():
    maps = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([5.0, np.nan])]
    assert heatmap_range(maps) == pytest.approx((3.0, 6.25))
    assert heatmap_range([]) is None


def test_heatmap_range_takes_its_red_end_from_the_peaks_of_maps_not_given_whole():
    maps = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([5.0, np.nan])]
    assert heatmap_range(maps, peaks=[8.0, np.nan]) == pytest.approx((3.0, 10.0))  # median of the maps alone
    assert heatmap_range(maps, peaks=[2.0]) == pytest.approx((3.0, 6.25))
    assert calibrate([1.0, 2.0, 3.0], maps, map_peaks=np.array([8.0])).map_range == pytest.approx((3.0, 10.0))


def test_calibrate_without_enough_scores_sets_no_threshold():
    calibration = calibrate([1.0, 2.0], [np.zeros(3)])
    assert calibration.threshold is None and calibration.map_range == (0.0, 0.0)
    assert calibrate(None).normal_scores is None and calibrate([]).threshold is None
