import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from defectlens.metrics import (
    au_pro,
    evaluate,
    f1_max,
    image_aupr,
    image_auroc,
    pixel_auroc,
)

# ---------------------------------------------------------------- image level

def test_image_auroc_known_answers():
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_image_aupr_hand_computed():
    # Ranked: + - + -. Precision at each recall step: 1/1 at recall .5, 2/3 at recall 1.
    assert image_aupr([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert image_aupr([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_f1_max_hand_computed():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    # Calling the top 1, 2, 3, 4 anomalous: F1 = 2/3, 1/2, 4/5, 2/3. Best: top 3, so the
    # threshold sits between 0.7 and 0.1.
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.4)
    predicted = scores > threshold
    tp = np.sum(predicted & (labels == 1))
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(f1)


def test_f1_max_threshold_edges():
    # Everything tied: best is calling all anomalous (precision 1/2, recall 1).
    f1, threshold = f1_max([0, 1], [0.5, 0.5])
    assert f1 == pytest.approx(2 / 3)
    assert threshold < 0.5 and np.nextafter(threshold, 1.0) == 0.5
    # Adjacent floats: the midpoint cannot land on the anomalous score.
    low, high = 1.0, np.nextafter(1.0, 2.0)
    f1, threshold = f1_max([0, 1], [low, high])
    assert f1 == 1.0 and low <= threshold < high


def test_image_metrics_nan_on_one_class():
    for labels in ([0, 0, 0], [1, 1, 1]):
        assert math.isnan(image_auroc(labels, [0.1, 0.2, 0.3]))
        assert math.isnan(image_aupr(labels, [0.1, 0.2, 0.3]))
        assert all(math.isnan(v) for v in f1_max(labels, [0.1, 0.2, 0.3]))


def test_image_metrics_reject_length_mismatch():
    with pytest.raises(ValueError):
        image_auroc([0, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------- pixel level

def two_region_case(tie: bool = False):
    """10×10 image: region A (2×2, score .9) and region B (4×4: top half .7, bottom half .2);
    80 normal pixels: 8 at .8 (or .9, tying with A), 16 at .5, 56 at 0."""
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True
    mask[6:10, 6:10] = True
    score_map = np.zeros((10, 10))
    score_map[0:2, 0:2] = 0.9
    score_map[6:8, 6:10] = 0.7
    score_map[8:10, 6:10] = 0.2
    normal = np.flatnonzero(~mask.ravel())
    score_map.ravel()[normal[:8]] = 0.9 if tie else 0.8
    score_map.ravel()[normal[8:24]] = 0.5
    return mask, score_map


def test_au_pro_step_curve_by_hand():
    mask, score_map = two_region_case()
    # Curve (FPR, PRO): (0,0) -> (0,.5) A found -> (.1,.5) -> (.1,.75) half of B
    # -> (.3,.75) -> (.3,1) rest of B -> (1,1).
    assert au_pro([mask], [score_map], 0.3) == pytest.approx((0.1 * 0.5 + 0.2 * 0.75) / 0.3)
    assert au_pro([mask], [score_map], 0.2) == pytest.approx((0.1 * 0.5 + 0.1 * 0.75) / 0.2)
    assert au_pro([mask], [score_map], 1.0) == pytest.approx(0.1 * 0.5 + 0.2 * 0.75 + 0.7)


def test_au_pro_ties_make_a_diagonal():
    mask, score_map = two_region_case(tie=True)
    # Normals tied with A: (0,0) -> (.1,.5) is one diagonal step; the rest as above.
    assert au_pro([mask], [score_map], 0.3) == pytest.approx((0.025 + 0.2 * 0.75) / 0.3)
    # A limit inside the diagonal interpolates on it: PRO .25 at FPR .05.
    assert au_pro([mask], [score_map], 0.05) == pytest.approx(0.5 * 0.05 * 0.25 / 0.05)


def test_au_pro_counts_good_images_as_normal():
    mask, score_map = two_region_case()
    good = np.zeros((8, 10))
    # 80 more normals at 0 halve every FPR before the last step.
    expected = (0.05 * 0.5 + 0.1 * 0.75 + 0.15 * 1.0) / 0.3
    assert au_pro([mask, None], [score_map, good]) == pytest.approx(expected)


def test_au_pro_regions_are_8_connected():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    score_map = np.zeros((5, 5))
    score_map.ravel()[np.flatnonzero(~mask.ravel())[:11]] = 0.7
    score_map[0, 0] = score_map[3, 3] = 1.0
    score_map[1, 1] = 0.5
    # Regions {(0,0),(1,1)} and {(3,3)}: PRO is (1/2 + 1)/2 = .75 until FPR .5, then 1.
    # Four-connected regions would give 2/3 instead of .75.
    assert au_pro([mask], [score_map], 1.0) == pytest.approx(0.5 * 0.75 + 0.5)


def test_pixel_metrics_perfect_inverted_constant():
    mask, _ = two_region_case()
    perfect = mask.astype(float)
    assert au_pro([mask], [perfect]) == 1.0
    assert pixel_auroc([mask], [perfect]) == 1.0
    assert au_pro([mask], [1 - perfect]) == 0.0
    assert pixel_auroc([mask], [1 - perfect]) == 0.0
    # A constant map is one diagonal, PRO = FPR: area fpr_limit²/2, normalised fpr_limit/2.
    assert au_pro([mask], [np.zeros((10, 10))], 0.3) == pytest.approx(0.15)
    assert pixel_auroc([mask], [np.zeros((10, 10))]) == pytest.approx(0.5)


def test_pixel_metrics_leave_inputs_untouched():
    masks, maps = random_case(0)
    maps = [m.astype(np.float64) for m in maps]
    before = [m.copy() for m in maps]
    au_pro(masks, maps)
    pixel_auroc(masks, maps)
    assert all(np.array_equal(a, b) for a, b in zip(maps, before))


def test_pixel_metrics_nan_without_both_classes():
    maps = [np.random.default_rng(0).random((4, 4))]
    assert math.isnan(au_pro([None], maps))
    assert math.isnan(pixel_auroc([np.zeros((4, 4))], maps))
    assert math.isnan(pixel_auroc([np.ones((4, 4))], maps))


def test_pixel_metrics_reject_bad_input():
    with pytest.raises(ValueError):
        pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError):
        au_pro([None, None], [np.zeros((4, 4))])
    with pytest.raises(ValueError):
        au_pro([np.ones((4, 4))], [np.full((4, 4), np.nan)])
    with pytest.raises(ValueError):
        au_pro([np.ones((4, 4))], [np.zeros((4, 4))], fpr_limit=0.0)


def random_case(seed: int):
    """Images of different sizes, blobby masks with regions of varied size, one good image,
    maps with heavy ties (quantised) so tied normal/defect scores are exercised."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for shape in [(12, 15), (9, 11), (14, 8)]:
        blobs = ndimage.gaussian_filter(rng.random(shape), 1.2)
        mask = blobs > np.quantile(blobs, 0.8)
        masks.append(mask)
        maps.append(np.round(rng.random(shape) + 0.6 * mask, 1).astype(np.float32))
    masks.append(None)
    maps.append(np.round(rng.random((10, 10)), 1).astype(np.float32))
    return masks, maps


def brute_force_au_pro(masks, maps, fpr_limit):
    """Plain reference: every distinct score as a threshold, PRO averaged region by region."""
    regions, normal_scores = [], []
    for mask, score_map in zip(masks, maps):
        mask = np.zeros(score_map.shape, bool) if mask is None else mask
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(score_map, labelled == k) for k in range(1, count + 1)]
        normal_scores.append(score_map[~mask])
    normal_scores = np.concatenate(normal_scores)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fprs.append(np.mean(normal_scores >= t))
        pros.append(np.mean([np.mean(m[region] >= t) for m, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= fpr_limit
    area = np.trapezoid(pros[inside], fprs[inside])
    if not inside.all():
        first_out = np.argmin(inside)
        x0, x1 = fprs[first_out - 1], fprs[first_out]
        y0, y1 = pros[first_out - 1], pros[first_out]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_au_pro_matches_brute_force(seed, fpr_limit):
    masks, maps = random_case(seed)
    expected = brute_force_au_pro(masks, maps, fpr_limit)
    assert au_pro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_pixel_auroc_matches_sklearn(seed):
    masks, maps = random_case(seed)
    flat_masks = np.concatenate([np.zeros(m.size, bool) if k is None else k.ravel()
                                 for k, m in zip(masks, maps)])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    expected = roc_auc_score(flat_masks, flat_maps)
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_au_pro_equals_pixel_auroc_for_one_region():
    # With a single region PRO is the pixel TPR, so the full-range AU-PRO is the pixel AUROC.
    rng = np.random.default_rng(7)
    mask = np.zeros((20, 20), bool)
    mask[5:12, 3:15] = True
    score_map = np.round(rng.random((20, 20)) + 0.4 * mask, 2)
    assert au_pro([mask], [score_map], 1.0) == pytest.approx(pixel_auroc([mask], [score_map]))


# ---------------------------------------------------------------- per defect type

def test_evaluate_per_defect_type():
    labels = [0, 0, 0, 1, 1, 1]
    types = ["good", "good", "good", "scratch", "scratch", "hole"]
    scores = [0.1, 0.2, 0.6, 0.9, 0.8, 0.5]
    report = evaluate(labels, scores, types)
    assert set(report) == {"all", "scratch", "hole"}
    assert report["scratch"]["image_auroc"] == 1.0
    assert report["hole"]["image_auroc"] == pytest.approx(2 / 3)
    assert report["all"]["image_auroc"] == image_auroc(labels, scores)
    assert (report["hole"]["n_normal"], report["hole"]["n_anomalous"]) == (3, 1)
    assert set(report["all"]) == {"n_normal", "n_anomalous", "image_auroc", "image_aupr",
                                  "f1_max", "f1_threshold"}


def test_evaluate_with_pixel_metrics():
    mask, score_map = two_region_case()
    good = np.zeros((8, 10))
    other = np.zeros((6, 6), bool)
    other[1:3, 1:3] = True
    report = evaluate([1, 0, 1], [0.9, 0.1, 0.8], ["crack", "good", "hole"],
                      masks=[mask, None, other], maps=[score_map, good, other * 1.0])
    # The crack block is the good-image case worked out by hand above.
    assert report["crack"]["au_pro"] == pytest.approx((0.05 * 0.5 + 0.1 * 0.75 + 0.15) / 0.3)
    assert report["hole"]["au_pro"] == 1.0
    assert report["hole"]["pixel_auroc"] == 1.0
    assert not math.isnan(report["all"]["pixel_auroc"])


def test_evaluate_without_normal_images_gives_nan():
    report = evaluate([1, 1], [0.3, 0.4], ["a", "b"])
    assert math.isnan(report["a"]["image_auroc"])
    assert report["a"]["n_normal"] == 0


def test_evaluate_rejects_half_of_the_pixel_inputs():
    with pytest.raises(ValueError):
        evaluate([0, 1], [0.1, 0.2], ["good", "a"], masks=[None, np.ones((2, 2))])
