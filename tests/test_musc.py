import json
from itertools import combinations

import numpy as np
import pytest
import torch
from conftest import textured_image
from PIL import Image

from defectlens.cli import main
from defectlens.models import Detector, create_detector
from defectlens.models.musc.model import batch_threshold
from defectlens.models.musc.mutual import (
    aggregate,
    interval_mean,
    mutual_scores,
    neighbour_agreement,
    reference_pairs,
    rescore,
    similar_image_mean,
)


def partners_of(pairs, count):
    partners = [[] for _ in range(count)]
    for first, second in pairs:
        for a, b in zip(first.tolist(), second.tolist()):
            partners[a].append(b)
            partners[b].append(a)
    return partners


@pytest.mark.parametrize("count, references, expected", [(7, None, 6), (8, None, 7), (10, 4, 4), (10, 5, 5), (9, 5, 4)])
def test_reference_pairs_give_every_image_distinct_partners_and_each_pair_once(count, references, expected):
    pairs = reference_pairs(count, references, seed=3)
    partners = partners_of(pairs, count)
    assert all(len(p) == expected and len(set(p)) == expected and i not in p for i, p in enumerate(partners))
    unordered = [frozenset(ab) for first, second in pairs for ab in zip(first.tolist(), second.tolist())]
    assert len(unordered) == len(set(unordered))
    if references is None:
        assert set(unordered) == {frozenset(c) for c in combinations(range(count), 2)}


def test_interval_mean_averages_the_best_matching_fraction():
    # Best similarities of one patch to four images: distances 0, 1, sqrt(2), 2 between unit vectors.
    similarities = torch.tensor([[[-1.0, 0.0, 1.0, 0.5]]])
    assert interval_mean(similarities, 0.5).item() == pytest.approx(0.5)
    assert interval_mean(similarities, 0.25).item() == pytest.approx(0.0)
    assert interval_mean(similarities, 1.0).item() == pytest.approx((0 + 1 + 2**0.5 + 2) / 4, rel=1e-6)


def hand_made_batch(count=8, seed=0):
    """Unit patch features on a 4×4 grid: every patch is one of four 'normal' directions, the
    same at each position in every image, except one outlier patch in image 3 at (1, 2)."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    layout = torch.arange(16).reshape(4, 4) % 4
    features = normal[layout].permute(2, 0, 1).expand(count, 16, 4, 4).clone()
    features[3, :, 1, 2] = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    return features


@pytest.mark.parametrize("references", [None, 4])
def test_outlier_patch_scores_highest_and_shared_patches_score_zero(references):
    features = hand_made_batch()
    scores = mutual_scores([features], references=references, keep=0.5)
    assert scores.shape == (8, 4, 4)
    assert torch.argmax(scores).item() == np.ravel_multi_index((3, 1, 2), (8, 4, 4))
    shared = torch.ones(8, 4, 4, dtype=torch.bool)
    shared[3, 1, 2] = False
    assert scores[shared].abs().max().item() < 1e-3
    assert scores[3, 1, 2].item() > 0.5


def test_patches_match_anywhere_in_the_other_images():
    """A patch is compared with every patch of the other images, not the one at its position."""
    features = hand_made_batch()
    features[0] = features[0].roll(shifts=(1, 2), dims=(1, 2))
    scores = mutual_scores([features], keep=0.5)
    assert scores[0].max().item() < 1e-3


def test_levels_are_scored_on_their_own_grid_and_averaged():
    fine = hand_made_batch()
    coarse = torch.nn.functional.avg_pool2d(hand_made_batch(seed=1), 2)
    scores = mutual_scores([fine, coarse], keep=0.5)
    alone = mutual_scores([fine], keep=0.5)
    coarse_up = torch.nn.functional.interpolate(mutual_scores([coarse], keep=0.5)[:, None], size=(4, 4),
                                                mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(scores, (alone + coarse_up) / 2)


def test_scores_follow_the_images_when_the_batch_is_reordered():
    features = hand_made_batch() + 0.05 * torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    torch.testing.assert_close(mutual_scores([features[order]]), mutual_scores([features])[order])


def test_aggregation_degree_averages_the_r_by_r_neighbourhood():
    features = torch.arange(25.0).reshape(1, 1, 5, 5)
    torch.testing.assert_close(aggregate(features, 1), features)
    three = aggregate(features, 3)
    assert three[0, 0, 2, 2].item() == pytest.approx(features[0, 0, 1:4, 1:4].mean().item())
    # At a corner only the patches that exist are averaged.
    assert three[0, 0, 0, 0].item() == pytest.approx(features[0, 0, :2, :2].mean().item())
    assert aggregate(features, 5)[0, 0, 2, 2].item() == pytest.approx(features.mean().item())


def test_several_degrees_average_the_maps_of_each_degree():
    features = hand_made_batch() + 0.05 * torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    expected = sum(mutual_scores([aggregate(features, r)], keep=0.3) for r in (1, 3, 5)) / 3
    torch.testing.assert_close(mutual_scores([features], keep=0.3, degrees=(1, 3, 5)), expected)


def test_published_settings_score_with_plain_rscin(batch):
    """degrees [1,3,5], the lowest 30 % over all other images, then RsCIN (k = 1..3) always applied."""
    published = create_detector("musc", size=64, degrees=[1, 3, 5], keep=0.3, references=None,
                                rescore="plain", rescore_neighbours=3)
    gated = create_detector("musc", **{**published.get_params(), "rescore": "gated"})
    features = gated.backbone_network.embed(batch, progress=None)
    levels = published.split_levels(features)
    maps = mutual_scores(levels, None, 0.3, 0, degrees=(1, 3, 5))
    flat = maps.flatten(1)
    raw = flat.topk(max(1, round(0.01 * flat.shape[1])), dim=1).values.mean(dim=1)
    image = torch.nn.functional.normalize(torch.cat([torch.nn.functional.normalize(level.mean(dim=(2, 3)), dim=1)
                                                     for level in levels], dim=1), dim=1)
    scores, patch_maps = published.score_features(features)
    torch.testing.assert_close(patch_maps, maps)
    np.testing.assert_allclose(scores, similar_image_mean(raw, image, 3).numpy(), rtol=1e-5)
    np.testing.assert_allclose(gated.score_features(features)[0], rescore(raw, image, 3).numpy(), rtol=1e-5)


def test_mutual_scoring_needs_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        mutual_scores([hand_made_batch()[:1]])


def test_similar_image_mean_weights_the_most_similar_images():
    scores = torch.tensor([1.0, 3.0, 10.0])
    features = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    smoothed = similar_image_mean(scores, features, neighbours=2)
    # k=1: the image itself; k=2: itself and its most similar image, weighted by similarity.
    expected = [(1 + (1 + 0.8 * 3) / 1.8) / 2, (3 + (3 + 0.8 * 1) / 1.8) / 2, (10 + (10 + 0.6 * 3) / 1.6) / 2]
    torch.testing.assert_close(smoothed, torch.tensor(expected))
    torch.testing.assert_close(similar_image_mean(scores, features, neighbours=1), scores)


def two_looks(count=40, seed=0):
    """Image features of two kinds of images (two clusters), half of each kind."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(2, 8, generator=generator), dim=1)
    kind = torch.arange(count) % 2
    features = torch.nn.functional.normalize(centres[kind] + 0.05 * torch.randn(count, 8, generator=generator), dim=1)
    return features, kind


def test_rescore_smooths_where_similar_images_agree_and_not_elsewhere():
    features, kind = two_looks()
    noise = 0.3 * torch.randn(40, generator=torch.Generator().manual_seed(1))
    # One kind of image is defective (high scores): similar images agree, smoothing removes noise.
    by_kind = kind.float() + noise
    assert neighbour_agreement(by_kind, features, 5) > 0.6
    smoothed = rescore(by_kind, features, 5)
    assert (smoothed[kind == 1].min() - smoothed[kind == 0].max()) > (by_kind[kind == 1].min() - by_kind[kind == 0].max())
    # Scores unrelated to the look of the image: nothing to gain, the scores stay (almost) as they are.
    unrelated = (torch.arange(40) < 20).float() + noise
    assert neighbour_agreement(unrelated, features, 5) < 0.2
    assert (rescore(unrelated, features, 5) - unrelated).abs().max() < 0.2
    torch.testing.assert_close(rescore(by_kind, features, 1), by_kind)


def test_batch_threshold_sits_above_the_normal_bulk():
    scores = np.r_[np.random.default_rng(0).normal(1.0, 0.1, 95), [3.0, 3.5, 4.0, 5.0, 6.0]]
    threshold = batch_threshold(scores)
    assert 1.15 < threshold < 1.45
    assert batch_threshold(np.array([1.0, 2.0])) is None


@pytest.fixture(scope="module")
def batch():
    """Twelve normal textures and two with a defect (a bright square, a dark scratch)."""
    rng = np.random.default_rng(7)
    images = [textured_image(rng, 96) for _ in range(14)]
    images[4][60:74, 20:34] = (250, 40, 40)
    images[9][10:14, 30:80] = (20, 20, 20)
    return images


def test_defective_images_rank_first_and_maps_peak_on_the_defect(batch):
    detector = create_detector("musc", size=96).fit([])
    prediction = detector.predict(batch)
    assert set(np.argsort(prediction.scores)[-2:]) == {4, 9}
    assert prediction.maps.shape == (14, 96, 96)
    peak = np.unravel_index(np.argmax(prediction.maps[4]), (96, 96))
    assert 52 <= peak[0] <= 82 and 12 <= peak[1] <= 42
    # The threshold comes from the batch: the two defects above it, (nearly) every normal below.
    assert detector.threshold is not None
    flagged = np.flatnonzero(prediction.labels(detector.threshold))
    assert {4, 9} <= set(flagged) and len(flagged) <= 3
    low, high = detector.map_range
    assert 0 < low < high


def test_maps_at_each_images_size_and_paths_accepted(batch, tmp_path):
    paths = []
    for i, image in enumerate(batch[:5]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    wide = np.ascontiguousarray(np.concatenate([batch[5], batch[6]], axis=1))
    prediction = create_detector("musc", size=96).predict([*paths, wide])
    assert [m.shape for m in prediction.maps] == [(96, 96)] * 5 + [(96, 192)]


def test_model_file_holds_parameters_and_reproduces_scores(batch, tmp_path):
    detector = create_detector("musc", size=64, references=3, keep=0.3)
    with pytest.warns(UserWarning, match="zero-shot"):
        detector.fit(batch[:3])
    loaded = Detector.load(detector.save(tmp_path / "musc.dlmodel"))
    assert loaded.name == "musc" and loaded.get_params() == detector.get_params() and loaded.threshold is None
    np.testing.assert_allclose(loaded.predict(batch[:6]).scores, detector.predict(batch[:6]).scores, rtol=1e-6)


def test_benchmark_zero_shot_and_predict_labels_from_the_batch(synthetic_mvtec, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", str(synthetic_mvtec), "--method", "musc", "--shots", "0", "--size", "96",
                 "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["shots"] == 0 and run["threshold"] is not None
    assert run["metrics"]["all"]["image_auroc"] > 0.5 and "au_pro" in run["metrics"]["all"]

    model = tmp_path / "musc.dlmodel"
    assert main(["fit", str(synthetic_mvtec), "-o", str(model), "--method", "musc", "--shots", "0", "--size", "96"]) == 0
    assert "set from each predicted batch of 3 images or more" in capsys.readouterr().out
    csv_path = tmp_path / "scores.csv"
    assert main(["predict", str(model), str(synthetic_mvtec / "test"), "--csv", str(csv_path)]) == 0
    rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:]]
    # The model file has no threshold: the labels come from the threshold set on this batch.
    assert len(rows) == 14 and all(label in ("anomalous", "normal") for _, _, label, *_ in rows)
    flagged = [float(score) for _, score, label, *_ in rows if label == "anomalous"]
    passed = [float(score) for _, score, label, *_ in rows if label == "normal"]
    assert passed and (not flagged or min(flagged) > max(passed))
