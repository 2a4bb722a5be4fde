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


def test_false_positives_outside_the_regions_of_anomalous_images_count():
    """The official rule: a hot spot outside the masks of an anomalous image is a false positive.

    Defect-free pixels: the good image's 0.1 and 0.2, and the anomalous image's 0.9 and 0.3
    (4 in all). Lowering the threshold: 0.9 is a false positive (FPR 1/4, sPRO 0), then the
    region's 0.6 and 0.4 bring sPRO to 1/2 and 1 at FPR 1/4. Counting the good image only, the
    region would saturate before any false positive, for an area of 1 at every limit.
    """
    good = np.array([[0.1, 0.2]])
    bad = np.array([[0.6, 0.4, 0.9, 0.3]])
    regions = [[], [DefectRegion(np.array([[True, True, False, False]]), 2.0)]]
    fpr, spro = spro_curve(regions, [good, bad])
    assert sorted(set(zip(np.round(fpr, 9), np.round(spro, 9)))) == [(0, 0), (0.25, 0), (0.25, 0.5), (0.25, 1), (1, 1)]
    assert au_spro(regions, [good, bad], 0.05) == 0.0
    assert au_spro(regions, [good, bad], 0.3) == pytest.approx(0.05 / 0.3)
    assert au_spro(regions, [good, bad], 1.0) == pytest.approx(0.75)


def test_a_pixel_in_any_region_of_its_image_is_never_a_false_positive():
    """Two overlapping regions: a pixel of one that the other does not cover is still a defect."""
    good = np.array([[0.0, 0.0]])
    bad = np.array([[0.9, 0.8, 0.1]])
    first, second = np.array([[True, False, False]]), np.array([[True, True, False]])
    regions = [[], [DefectRegion(first, 1.0), DefectRegion(second, 2.0)]]
    # 0.9 saturates the first region and half the second, 0.8 the rest, all at FPR 0.
    assert au_spro(regions, [good, bad], 0.05) == pytest.approx(1.0)


def test_regions_count_equally_whatever_their_size():
    """Two regions, one found at once, one never before every good pixel: sPRO is 1/2 then 1."""
    good = np.array([[0.5, 0.5]])
    first = np.array([[0.9, 0.9, 0.9, 0.9]])
    second = np.array([[0.1, 0.8]])
    regions = [[], [DefectRegion(np.ones((1, 4), bool), 4.0)], [DefectRegion(np.array([[True, False]]), 1.0)]]
    assert au_spro(regions, [good, first, second], 0.3) == pytest.approx(0.5)


def _official_au_spro(regions_per_image, maps, fpr_limit):
    """The official evaluation's rule, written independently with plain loops: binarise every map
    at each threshold (score > t, every distinct score and one below all), per region the
    saturated overlap, per image the flagged pixels outside all of its regions, FPR over all
    defect-free pixels; then the trapezoid up to ``fpr_limit``, interpolated there."""
    values = sorted({float(v) for m in maps for v in m.ravel()})
    thresholds = [values[0] - 1.0] + values
    points = []
    for t in thresholds:
        overlaps, false_positives, negatives = [], 0, 0
        for regions, score_map in zip(regions_per_image, maps):
            height, width = score_map.shape
            for region in regions:
                hits = sum(1 for y in range(height) for x in range(width)
                           if region.mask[y, x] and score_map[y, x] > t)
                overlaps.append(min(1.0, hits / region.saturation))
            for y in range(height):
                for x in range(width):
                    if not any(region.mask[y, x] for region in regions):
                        negatives += 1
                        false_positives += score_map[y, x] > t
        points.append((false_positives / negatives, sum(overlaps) / len(overlaps)))
    points.sort()
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def test_parity_with_the_official_rule_on_random_maps_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(3):
        maps = [rng.integers(0, 12, (5, 6)).astype(float) for _ in range(5)]
        regions = [[], [],
                   [DefectRegion(rng.random((5, 6)) < 0.3, 2.5), DefectRegion(rng.random((5, 6)) < 0.2, 30.0)],
                   [DefectRegion(rng.random((5, 6)) < 0.4, 1.0)],
                   [DefectRegion(rng.random((5, 6)) < 0.5, 4.0)]]
        regions = [[r for r in rs if r.mask.any()] for rs in regions]
        for limit in (0.05, 0.3, 1.0):
            assert au_spro(regions, maps, limit) == pytest.approx(_official_au_spro(regions, maps, limit)), (trial, limit)


def test_undefined_cases_give_nan_and_bad_inputs_raise():
    regions, maps = _hand_case()
    assert math.isnan(au_spro([[], []], maps))  # no region
    assert math.isnan(au_spro([regions[1]], [maps[1]]))  # every pixel is a defect
    with pytest.raises(ValueError):
        au_spro(regions, maps, fpr_limit=0.0)
    with pytest.raises(ValueError):
        au_spro(regions, maps[:1])
    with pytest.raises(ValueError):
        au_spro([[], [DefectRegion(np.ones((3, 3), bool), 1.0)]], maps)
