import math

import numpy as np
import pytest

from defectlens.metrics.spro import (
    DefectRegion,
    au_spro,
    defect_regions,
    saturation_area,
    spro_curve,
)

CONFIG = [
    {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 250, "saturation_threshold": 3, "relative_saturation": False},
]


def test_saturation_area_relative_absolute_and_scaled():
    assert saturation_area(100, CONFIG[0]) == 50.0
    assert saturation_area(100, CONFIG[1]) == 3.0
    # An absolute count larger than the region saturates when the whole region is flagged.
    assert saturation_area(2, CONFIG[1]) == 2.0
    # Masks evaluated at half the side: a quarter of the pixels.
    assert saturation_area(100, {**CONFIG[1], "saturation_threshold": 40}, scale=0.25) == 10.0


def test_defect_regions_split_by_pixel_value():
    values = np.zeros((4, 4), np.uint8)
    values[0, :2] = 255
    values[3, :] = 250
    regions = sorted(defect_regions(values, CONFIG), key=lambda r: r.saturation)
    assert [r.saturation for r in regions] == [1.0, 3.0]  # 0.5 × 2 pixels; min(3, 4 pixels)
    assert regions[0].mask.sum() == 2 and regions[1].mask.sum() == 4
    assert defect_regions(np.zeros((4, 4), np.uint8), CONFIG) == []
    with pytest.raises(ValueError, match="pixel value 7"):
        defect_regions(np.full((2, 2), 7, np.uint8), CONFIG)


def _hand_case():
    """A 2×2 anomaly-free image and a 2×2 image whose four pixels are one region saturating at 3."""
    good = np.array([[0.5, 0.4], [0.3, 0.2]])
    bad = np.array([[0.9, 0.45], [0.35, 0.1]])
    region = DefectRegion(np.ones((2, 2), bool), 3.0)
    return [[], [region]], [good, bad]


def test_hand_computed_curve_and_areas():
    regions, maps = _hand_case()
    fpr, spro = spro_curve(regions, maps)
    # Descending: 0.9 (region) 0.5 (good) 0.45 (region) 0.4 (good) 0.35 (region: saturated),
    # then 0.3 and 0.2 (good) and 0.1 (region, no gain past saturation). Vertices sit at region scores.
    points = sorted(set(zip(np.round(fpr, 9), np.round(spro, 9))))
    assert points == [(0, 0), (0, round(1 / 3, 9)), (0.25, round(1 / 3, 9)), (0.25, round(2 / 3, 9)),
                      (0.5, round(2 / 3, 9)), (0.5, 1), (1, 1)]
    # Up to FPR 0.3: 0.25 × 1/3 + 0.05 × 2/3, divided by 0.3.
    assert au_spro(regions, maps, 0.3) == pytest.approx((0.25 / 3 + 0.05 * 2 / 3) / 0.3)
    assert au_spro(regions, maps, 0.05) == pytest.approx(1 / 3)
    assert au_spro(regions, maps, 1.0) == pytest.approx(0.75)


def test_pixels_outside_regions_of_anomalous_images_are_ignored():
    regions, maps = _hand_case()
    bigger = np.zeros((2, 3))
    bigger[:, :2] = maps[1]
    bigger[:, 2] = 100.0  # a hot spot outside the annotated region
    mask = np.zeros((2, 3), bool)
    mask[:, :2] = True
    assert au_spro([[], [DefectRegion(mask, 3.0)]], [maps[0], bigger], 0.3) == au_spro(regions, maps, 0.3)


def test_regions_count_equally_whatever_their_size():
    """Two regions, one found at once, one never before every good pixel: sPRO is 1/2 then 1."""
    good = np.array([[0.5, 0.5]])
    first = np.array([[0.9, 0.9, 0.9, 0.9]])
    second = np.array([[0.1, 0.8]])
    regions = [[], [DefectRegion(np.ones((1, 4), bool), 4.0)], [DefectRegion(np.array([[True, False]]), 1.0)]]
    assert au_spro(regions, [good, first, second], 0.3) == pytest.approx(0.5)


def test_matches_the_definition_on_random_maps_with_ties():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 12, (6, 7)).astype(float) for _ in range(5)]
    regions = [[], [],
               [DefectRegion(rng.random((6, 7)) < 0.3, 2.5), DefectRegion(rng.random((6, 7)) < 0.2, 30.0)],
               [DefectRegion(rng.random((6, 7)) < 0.4, 1.0)],
               [DefectRegion(rng.random((6, 7)) < 0.5, 4.0)]]
    normal = np.concatenate([maps[0].ravel(), maps[1].ravel()])
    all_regions = [(r, m) for rs, m in zip(regions, maps) for r in rs]

    def point(t):
        spro = np.mean([min(1.0, (m[r.mask] >= t).sum() / r.saturation) for r, m in all_regions])
        return (normal >= t).mean(), spro

    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fpr, spro = np.array([(0.0, 0.0)] + [point(t) for t in thresholds]).T
    for limit in (0.05, 0.3, 1.0):
        inside = fpr <= limit
        x = np.append(fpr[inside], limit)
        y = np.append(spro[inside], np.interp(limit, fpr, spro))
        assert au_spro(regions, maps, limit) == pytest.approx(np.trapezoid(y, x) / limit)


def test_undefined_cases_give_nan_and_bad_inputs_raise():
    regions, maps = _hand_case()
    assert math.isnan(au_spro([[], []], maps))  # no region
    assert math.isnan(au_spro([regions[1]], [maps[1]]))  # no anomaly-free image
    with pytest.raises(ValueError):
        au_spro(regions, maps, fpr_limit=0.0)
    with pytest.raises(ValueError):
        au_spro(regions, maps[:1])
    with pytest.raises(ValueError):
        au_spro([[], [DefectRegion(np.ones((3, 3), bool), 1.0)]], maps)
