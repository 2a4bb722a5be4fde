"""The composition detector on tiny scenes whose answers are known: two coloured discs on a grey
tray, where a missing, swapped or extra disc is a logical anomaly no patch looks wrong for."""

import json

import cv2
import numpy as np
import pytest
import torch

from defectlens.models import Detector, create_detector
from defectlens.models import ModelFileError
from defectlens.errors import UsageError
from defectlens.models.composition.model import (
    FLOORS,
    FUSION_MIN_SPREAD,
    HELD_OUT_WEIGHTS,
    NAIVE_WEIGHTS,
    SCORES,
    WRITE_UP_SCORES,
    ClassSortedPatches,
    combine,
    nearest_patches,
    pooled_spread,
    spread,
)
from defectlens.models.composition.parts import ImageParts, class_distances, image_vectors
from defectlens.models.composition.sam import vote_in_regions
from defectlens.models.composition.segment import (
    background_classes,
    guided_upsample,
    majority_filter,
)
from defectlens.models.composition.views import MAX_GAIN, shot_views
from defectlens.models.composition.words import out_of_place, word_places

SIZE = 96
PARAMS = {"size": 96, "part_size": 48, "parts": 4}
RED, BLUE = (200, 40, 40), (40, 60, 200)


def scene(rng, discs):
    """Grey tray with sensor noise and discs given as (colour, (x, y)) with jittered positions."""
    image = np.clip(rng.normal(150, 3, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    for colour, (x, y) in discs:
        centre = (int(x + rng.integers(-3, 4)), int(y + rng.integers(-3, 4)))
        cv2.circle(image, centre, 10, colour, -1, cv2.LINE_AA)
    return image


def normal(rng):
    return scene(rng, [(RED, (28, 48)), (BLUE, (68, 48))])


@pytest.fixture(scope="module")
def fitted():
    """Four shots alone (no views): the known answers below are about the shots' own patches."""
    rng = np.random.default_rng(0)
    detector = create_detector("composition", views=0, **PARAMS).fit([normal(rng) for _ in range(4)])
    return detector, rng


def calibrated_scores(detector, images):
    features = detector.backbone_network.embed(images)
    parts, _ = detector.compose(images, features)
    return [detector.score_parts(p)[0] for p in parts]


def test_logical_anomalies_raise_the_scores_that_see_them(fitted):
    detector, rng = fitted
    goods = calibrated_scores(detector, [normal(rng) for _ in range(4)])
    missing, swapped = calibrated_scores(detector, [scene(rng, [(RED, (28, 48))]),
                                                    scene(rng, [(BLUE, (28, 48)), (RED, (68, 48))])])
    # A missing disc leaves no picture of itself: the histogram (pixel share) is what sees it.
    assert missing["histogram"] > 3 * max(g["histogram"] for g in goods)
    # Swapped discs: every part is present and looks normal, but sits in the other's place.
    assert swapped["location"] > 3 * max(g["location"] for g in goods)
    for anomaly in (missing, swapped):
        assert combine(anomaly) > max(combine(g) for g in goods)


def test_a_part_moved_where_no_shot_has_it_raises_the_placement_score(fitted):
    """The red disc in the far corner: every count and colour is right, its patches are not."""
    detector, rng = fitted
    goods = calibrated_scores(detector, [normal(rng) for _ in range(4)])
    images = [scene(rng, [(RED, (82, 82)), (BLUE, (68, 48))]) for _ in range(2)]
    moved = calibrated_scores(detector, images)
    assert min(m["placement"] for m in moved) > 3 * max(1.0, max(g["placement"] for g in goods))
    assert min(combine(m) for m in moved) > max(combine(g) for g in goods)
    # The map paints the patches out of place: the disc in the far corner of the 12 x 12 grid (and
    # tray patches around it, whose features see it), and nothing on a good scene.
    images.append(normal(rng))
    compositions, _ = detector.compose(images, detector.backbone_network.embed(images))
    for composition, calibrated in zip(compositions, moved):
        painted = detector.placement_map(composition, calibrated)
        assert painted[9:12, 9:12].all() and painted.max() == pytest.approx(calibrated["placement"] - 2.0)
    assert not detector.placement_map(compositions[-1], detector.score_parts(compositions[-1])[0]).any()


def test_word_places_known_answer():
    references = np.zeros((2, 6, 6), np.int64)
    references[0, 0, 0], references[1, 5, 5] = 1, 2
    places = word_places(references, 3, radius=1)
    assert places[0].all()  # the tray's word is everywhere
    np.testing.assert_array_equal(np.argwhere(places[1]), [[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(np.argwhere(places[2]), [[4, 4], [4, 5], [5, 4], [5, 5]])
    test = np.zeros((6, 6), np.int64)
    test[0, 1], test[3, 3], test[4, 4], test[0, 5] = 1, 1, 2, 2  # in place, out, in place, out
    np.testing.assert_array_equal(np.argwhere(out_of_place(test, places)), [[0, 5], [3, 3]])
    assert not out_of_place(references[0], places).any()


def with_dots(rng, count):
    """A normal scene with ``count`` small grey dots in a row above the discs (two are normal)."""
    image = normal(rng)
    for x, y in [(20, 15), (48, 15), (76, 15)][:count]:
        cv2.circle(image, (int(x + rng.integers(-2, 3)), int(y + rng.integers(-2, 3))), 4, (90, 90, 90), -1, cv2.LINE_AA)
    return image


def test_an_extra_small_part_raises_the_words_score():
    """A dot a third of a disc wide: its patches are one word's more than any reference has."""
    rng = np.random.default_rng(0)
    detector = create_detector("composition", **PARAMS).fit([with_dots(rng, 2) for _ in range(4)])
    goods = calibrated_scores(detector, [with_dots(rng, 2) for _ in range(6)])
    extras = calibrated_scores(detector, [with_dots(rng, 3) for _ in range(3)])
    assert min(e["words"] for e in extras) > 2 * max(g["words"] for g in goods)
    assert min(combine(e) for e in extras) > max(combine(g) for g in goods)


def rewritten(detector, path, drop: str | None = None, location_floor: float | None = None,
              drop_extra: str | None = None):
    """The detector saved to ``path``, then the file rewritten as an older or edited one: without
    the tensor ``drop`` or the learned entry ``drop_extra``, or with another location floor."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    detector.save(path)
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["defectlens"])
    tensors = load_file(str(path))
    if drop is not None:
        del tensors[drop]
    if location_floor is not None:
        config["extra"]["floors"]["location"] = location_floor
    if drop_extra is not None:
        del config["extra"][drop_extra]
    save_file(tensors, str(path), metadata={"defectlens": json.dumps(config)})
    return path


@pytest.mark.parametrize("tensor, message", [("words.centroids", "no patch words.*fit it again"),
                                             ("refs.word_map", "no word maps.*placement.*fit it again")])
def test_a_model_file_from_before_a_score_says_to_fit_again(fitted, tmp_path, tensor, message):
    with pytest.raises(ModelFileError, match=f"older.dlmodel.*{message}"):
        Detector.load(rewritten(fitted[0], tmp_path / "older.dlmodel", drop=tensor))


def test_a_model_file_keeps_the_floors_it_was_calibrated_with(fitted, tmp_path):
    """Its threshold was set with them: floors changed in a later version must not move its scores."""
    detector, _ = fitted
    current = Detector.load(detector.save(tmp_path / "current.dlmodel")).memory
    assert current.floors == FLOORS
    older = Detector.load(rewritten(detector, tmp_path / "older.dlmodel", location_floor=FLOORS["location"] / 2)).memory
    assert older.floors["location"] == FLOORS["location"] / 2
    # The per-class spreads are the file's own; only the floor under them differs.
    np.testing.assert_allclose(np.maximum(older.class_norms["location"], FLOORS["location"]),
                               current.class_norms["location"])
    assert older.class_norms["location"].min() < FLOORS["location"]


def test_held_out_weights_count_in_the_image_score_and_older_files_weigh_scores_alike(fitted, tmp_path):
    detector, rng = fitted
    assert detector.weights == HELD_OUT_WEIGHTS
    image = scene(rng, [(BLUE, (28, 48)), (RED, (68, 48))])
    calibrated = calibrated_scores(detector, [image])[0]
    weighted = np.sqrt(sum((HELD_OUT_WEIGHTS.get(s, 1.0) * calibrated[s]) ** 2 for s in SCORES))
    assert detector.predict([image]).scores[0] == pytest.approx(weighted, rel=1e-6)
    assert weighted != pytest.approx(combine(calibrated), rel=1e-3)  # the weights matter for this image
    # A file saved before the weights keeps scoring as it was calibrated: every score counts once.
    older = Detector.load(rewritten(detector, tmp_path / "older.dlmodel", drop_extra="weights"))
    assert older.weights == {}
    assert older.predict([image]).scores[0] == pytest.approx(combine(calibrated), rel=1e-6)


def test_map_shows_a_missing_part_where_it_should_be_and_a_swap_at_both_places(fitted):
    detector, rng = fitted
    good, missing, swapped = detector.predict([normal(rng), scene(rng, [(RED, (28, 48))]),
                                               scene(rng, [(BLUE, (28, 48)), (RED, (68, 48))])]).maps
    left, right = np.s_[42:55, 22:35], np.s_[42:55, 62:75]  # around the two disc centres
    # Nothing of the blue disc is left to look wrong: only the part evidence can light its place.
    assert missing[right].mean() > 4 * max(missing[left].mean(), good.max())
    assert min(swapped[left].mean(), swapped[right].mean()) > good.max()


def test_the_same_part_gets_the_same_class_in_every_image(fitted):
    detector, rng = fitted
    images = [normal(rng) for _ in range(3)] + [scene(rng, [(BLUE, (28, 48)), (RED, (68, 48))])]
    prediction = detector.predict(images)
    centres = [((28, 48), (68, 48))] * 3 + [((68, 48), (28, 48))]  # (red, blue) centres
    for part_map, (red, blue) in zip(prediction.part_maps, centres):
        assert part_map.shape == (SIZE, SIZE)
        red_class, blue_class = part_map[red[1], red[0]], part_map[blue[1], blue[0]]
        assert (red_class, blue_class) == (prediction.part_maps[0][48, 28], prediction.part_maps[0][48, 68])
        assert len({red_class, blue_class, part_map[5, 5]}) == 3  # red, blue and the tray differ


def test_prediction_contract_and_model_file_round_trip(fitted, tmp_path):
    detector, rng = fitted
    images = [normal(rng), scene(rng, [(RED, (28, 48))])]
    before = detector.predict(images)
    assert before.scores.shape == (2,) and before.maps.shape == (2, SIZE, SIZE)
    assert detector.threshold is not None and detector.normal_scores.shape == (4,)
    assert detector.map_range[0] < detector.map_range[1]
    loaded = Detector.load(detector.save(tmp_path / "composition.dlmodel"))
    after = loaded.predict(images)
    np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6)
    np.testing.assert_allclose(after.maps, before.maps, rtol=1e-5, atol=1e-6)
    for a, b in zip(after.part_maps, before.part_maps):
        np.testing.assert_array_equal(a, b)
    assert loaded.threshold == detector.threshold


@pytest.mark.parametrize("params, shots, resolved", [
    ({}, 2, (0, "max")), ({}, 3, (2, "pooled")), ({}, 8, (2, "pooled")), ({}, 9, (0, "max")),
    ({"scoring": "published"}, 4, (0, "max")), ({"views": 1}, 2, (1, "pooled")),
    ({"views": 2, "normalise": "max"}, 4, (2, "max")), ({"views": 0, "normalise": "pooled"}, 4, (0, "pooled")),
])
def test_views_and_normalise_default_by_the_number_of_shots(params, shots, resolved):
    assert create_detector("composition", **params).resolve_views(shots) == resolved


def test_default_at_four_shots_fits_views_and_keeps_them_in_the_model_file(tmp_path):
    rng = np.random.default_rng(1)
    detector = create_detector("composition", **PARAMS).fit([normal(rng) for _ in range(4)])
    assert detector.views is None and (detector.views_used, detector.normalise_used) == (2, "pooled")
    assert detector.normal_scores.shape == (12,)  # every shot and each of its two views held out
    images = [normal(rng), scene(rng, [(RED, (28, 48))])]
    before = detector.predict(images).scores
    assert before[1] > detector.threshold > before[0]
    loaded = Detector.load(detector.save(tmp_path / "composition.dlmodel"))
    assert (loaded.views, loaded.views_used, loaded.normalise_used) == (None, 2, "pooled")
    np.testing.assert_allclose(loaded.predict(images).scores, before, rtol=1e-6)


def test_calibration_one_shot_and_single_score_ablation(fitted):
    detector, rng = fitted
    # Class-wise scores are calibrated per class; only patch scores get a leave-one-out divisor.
    assert all(detector.normalisers[s] == 1.0 for s in ("embedding", "histogram", "colour", "location"))
    assert all(0 < detector.normalisers[s] < 1.5 for s in ("agnostic", "aware", "foreground"))
    single = create_detector("composition", scores=["histogram"], **PARAMS).fit([normal(np.random.default_rng(0)) for _ in range(4)])
    image = scene(rng, [(RED, (28, 48))])
    assert single.predict([image]).scores[0] == pytest.approx(calibrated_scores(single, [image])[0]["histogram"])
    # Two shots leave one distance out: the naive weights stay, and two held-out scores set no
    # threshold (they are nearly equal by symmetry); the heatmap range still comes from them.
    two = create_detector("composition", **PARAMS).fit([normal(rng) for _ in range(2)])
    assert two.normalisers == NAIVE_WEIGHTS and two.weights == {}  # the weights go with held-out normalisers
    assert two.threshold is None and two.map_range is not None
    one = create_detector("composition", **PARAMS).fit([normal(rng)])
    assert one.threshold is None and one.normal_scores is None
    assert np.isfinite(one.predict([normal(rng)]).scores).all()


def test_shot_views_and_pooled_spreads_known_answers():
    flat = np.full((40, 60, 3), 100, np.uint8)
    images, sources = shot_views([flat, flat + 50], 3, seed=0)
    assert len(images) == 8 and sources.tolist() == [0, 1, 0, 0, 0, 1, 1, 1]
    # A view moves and re-exposes the scene: a uniform shot stays uniform, within the exposure jitter.
    for view, source in zip(images[2:], sources[2:]):
        level = 100 + 50 * source
        assert view.shape == flat.shape and view.min() == view.max()
        assert abs(int(view[0, 0, 0]) - level) <= MAX_GAIN * level + 1
    assert shot_views([flat], 0, seed=0)[1].tolist() == [0]
    distances = np.array([[1.0, np.nan, 2.0], [3.0, np.nan, np.nan]])
    np.testing.assert_array_equal(pooled_spread(distances, pooled=True), [2.0, np.nan, 2.0])
    np.testing.assert_array_equal(pooled_spread(distances, pooled=False), [3.0, np.nan, 2.0])
    assert spread(np.array([1.0, 3.0])) == pytest.approx(np.sqrt(2))
    assert spread(np.array([5.0, 5.0])) == pytest.approx(FUSION_MIN_SPREAD * 5.0)


def test_views_and_pooled_spreads_give_every_shot_and_view_a_held_out_score():
    rng = np.random.default_rng(1)
    shots = [normal(rng) for _ in range(4)]
    detector = create_detector("composition", views=2, normalise="pooled", **PARAMS).fit(shots)
    # Each shot and its two views are left out together and scored: 4 × 3 held-out scores.
    assert detector.normal_scores.shape == (12,)
    # Pooled spreads are means where the write-up takes the largest: never larger, same floors.
    largest = create_detector("composition", views=2, normalise="max", **PARAMS).fit(shots)
    for name in ("agnostic", "aware", "foreground"):
        assert 0 < detector.normalisers[name] <= largest.normalisers[name]
    for quantity, norms in detector.memory.class_norms.items():
        assert (norms <= largest.memory.class_norms[quantity] + 1e-12).all()
    goods = detector.predict([normal(rng) for _ in range(4)]).scores
    missing, swapped = detector.predict([scene(rng, [(RED, (28, 48))]),
                                         scene(rng, [(BLUE, (28, 48)), (RED, (68, 48))])]).scores
    assert min(missing, swapped) > goods.max()


@pytest.mark.parametrize("structural_params", [None, {"size": 192, "top_fraction": 0.005}])
def test_structural_fusion_is_the_larger_standardised_score_and_round_trips(tmp_path, structural_params):
    rng = np.random.default_rng(2)
    detector = create_detector("composition", structural="patchknn", views=1, structural_params=structural_params,
                               **PARAMS).fit([normal(rng) for _ in range(4)])
    crumb = normal(rng)
    cv2.circle(crumb, (48, 20), 4, (30, 20, 10), -1)  # a dark crumb on the tray: structural, no rule broken
    images = [normal(rng), normal(rng), crumb, scene(rng, [(RED, (28, 48))])]
    prediction = detector.predict(images)
    # Known answer: each detector's score standardised by its own held-out normal scores, the larger kept.
    own = np.array([detector._combine_calibrated(c) for c in calibrated_scores(detector, images)])
    member_network = detector.structural_member.backbone_network  # its own pass at its own size, if given
    assert member_network.input_hw == (((structural_params or PARAMS)["size"],) * 2)
    member, _ = detector.structural_member.score_feature_batch(member_network.embed(images))
    mean, deviation, member_mean, member_deviation = detector.fusion
    np.testing.assert_allclose(prediction.scores, np.maximum((own - mean) / deviation, (member - member_mean) / member_deviation))
    assert min(prediction.scores[2:]) > max(prediction.scores[:2])
    assert detector.normal_scores.shape == (8,) and detector.threshold > detector.normal_scores.max() - 1e-9
    loaded = Detector.load(detector.save(tmp_path / "fused.dlmodel"))
    again = loaded.predict(images)
    np.testing.assert_allclose(again.scores, prediction.scores, rtol=1e-6)
    np.testing.assert_allclose(again.maps, prediction.maps, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="at least 2 normal images"):
        create_detector("composition", structural="patchknn", **PARAMS).fit([normal(rng)])


def test_structural_member_learns_from_its_own_augmented_copies():
    rng = np.random.default_rng(5)
    shots = [normal(rng) for _ in range(3)]
    plain, flipped = (create_detector("composition", structural="patchknn", views=1, seed=0, **PARAMS,
                                      structural_params={"augment": augment}).fit(shots)
                      for augment in ("none", "flips"))
    # Three shots and one view each: six images, and with flips each image's two mirrors as well.
    rows = plain.structural_member.bank.shape[0]
    assert flipped.structural_member.bank.shape[0] == 3 * rows
    # A shot mirrored left-right (blue left of red) is one of the flipped member's own copies: every
    # patch of it is in that memory (distance 0), while the plain member has never seen its discs' edges.
    mirrored = [np.ascontiguousarray(shot[:, ::-1]) for shot in shots]
    features = plain.structural_member.backbone_network.embed(mirrored)
    plain_scores, _ = plain.structural_member.score_feature_batch(features)
    flipped_scores, _ = flipped.structural_member.score_feature_batch(features)
    np.testing.assert_allclose(flipped_scores, 0.0, atol=1e-4)
    assert (plain_scores > 0.05).all()


@pytest.mark.parametrize("params, message", [
    ({"structural_params": {"size": 512}}, "needs structural"),
    ({"structural": "patchknn", "structural_params": {"seed": 3}}, "sets seed: set those on the composition"),
    ({"structural": "patchknn", "structural_params": {"geometry": "tiles"}}, "not its geometry"),
    ({"structural": "patchknn", "structural_params": {"top_fraction": 2.0}}, "top_fraction"),
    ({"structural": "padim", "structural_params": {"bank_size": 10}}, "bank_size"),
])
def test_structural_params_are_checked(params, message):
    with pytest.raises(ValueError, match=message):
        create_detector("composition", **params).fit([np.zeros((32, 32, 3), np.uint8)] * 2)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="scores must be a non-empty list .* not \\['histogram', 'shape'\\]"):
        create_detector("composition", scores=["histogram", "shape"])
    with pytest.raises(ValueError, match="segmenter"):
        create_detector("composition", segmenter="watershed")
    with pytest.raises(ValueError, match="at least one"):
        create_detector("composition").fit([])


def test_nearest_patches_matches_brute_force():
    rng = np.random.default_rng(1)

    def parts(count, classes):
        patches = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(count, 8))).float(), dim=1)
        patch_class = torch.from_numpy(rng.integers(0, classes, count))
        return ImageParts(patches, patch_class, patch_class != 0, *[None] * 7)

    test, bank = parts(30, 4), parts(50, 3)  # class 3 is missing from the bank
    anyone, same, foreground = nearest_patches(test, ClassSortedPatches.of(bank), chunk=16)
    distance = 1 - test.patches @ bank.patches.T
    torch.testing.assert_close(anyone, distance.min(dim=1).values)
    for i in range(30):
        mine = bank.patch_class == test.patch_class[i]
        assert same[i] == pytest.approx(float(distance[i, mine].min()) if mine.any() else 1.0, abs=1e-6)
        assert foreground[i] == pytest.approx(float(distance[i, bank.foreground].min()), abs=1e-6)
    bank.foreground[0] = ~bank.foreground[0]  # one patch of its class differs: no column ranges
    with pytest.raises(ValueError, match="partly foreground"):
        ClassSortedPatches.of(bank)


def test_class_distances_known_answers():
    def parts(area, count, colour, location, words=(0, 0, 0)):
        classes = len(area)
        return ImageParts(None, None, None, np.array(area, float), np.array(count, float), np.array(colour, float),
                          np.array(location, float), np.eye(classes, 3), np.array(words, float), None)

    typical = np.array([0.16, 0.04])
    refs = ImageParts.stack([parts([0.16, 0.04], [1, 2], [[0, 0], [10, 0]], [[0.5, 0.5], [0.2, 0.2]], [3, 0, 5]),
                             parts([0.25, 0.0], [1, 0], [[0, 0], [0, 0]], [[0.5, 0.5], [0.0, 0.0]], [1, 2, 5])])
    test = parts([0.09, 0.04], [1, 3], [[3, 4], [10, 5]], [[0.5, 0.8], [0.2, 0.6]], [2, 4, 5])
    d = class_distances(test, refs, typical)
    np.testing.assert_allclose(d["area"], [0.1, 0.0])  # |0.3 - 0.4|; the second equals the first ref
    np.testing.assert_allclose(d["count"], [0, 1])
    np.testing.assert_allclose(d["colour"], [5, 5])  # class 1 is absent from the second ref: first only
    np.testing.assert_allclose(d["location"], [0.3, 0.4])
    np.testing.assert_allclose(d["embedding"], [0, 0], atol=1e-12)
    np.testing.assert_allclose(d["words"], [1, 2, 0])  # per word, the nearest reference's count
    absent = class_distances(parts([0.09, 0.0], [1, 0], [[0, 0]] * 2, [[0.5, 0.5]] * 2), refs, typical)
    assert np.isnan(absent["colour"][1]) and np.isnan(absent["location"][1])


def test_image_vectors_known_answers():
    """Pixel counts per class, mean a and b per class, centroid distance from the origin, class
    embeddings concatenated: over the foreground classes only."""
    parts = ImageParts(patches=torch.zeros(1, 2), patch_class=torch.zeros(1, dtype=torch.long),
                       foreground=torch.ones(1, dtype=torch.bool), area=np.array([0.5, 0.25, 0.25]),
                       count=np.array([1.0, 1.0, 2.0]), colour=np.array([[0.0, 0.0], [10.0, -5.0], [3.0, 4.0]]),
                       location=np.array([[0.5, 0.5], [0.3, 0.4], [0.6, 0.8]]),
                       embedding=np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), words=np.zeros(4),
                       word_map=np.zeros((1, 1), np.int64))
    vectors = image_vectors(parts, np.array([False, True, True]), pixels=100)
    np.testing.assert_allclose(vectors["histogram"], [25.0, 25.0])
    np.testing.assert_allclose(vectors["colour"], [10.0, -5.0, 3.0, 4.0])
    np.testing.assert_allclose(vectors["location"], [0.5, 1.0])
    np.testing.assert_allclose(vectors["embedding"], [0.0, 1.0, 0.6, 0.8])
    stacked = image_vectors(ImageParts.stack([parts, parts]), np.array([False, True, True]), pixels=100)
    assert stacked["colour"].shape == (2, 4) and stacked["location"].shape == (2, 2)


def test_published_scoring_nearest_vector_leave_one_out_weights_and_sum():
    rng = np.random.default_rng(0)
    shots = [normal(rng) for _ in range(4)]
    detector = create_detector("composition", **PARAMS, scoring="published").fit(shots)
    features = detector.backbone_network.embed(shots)
    refs, _ = detector.compose(shots, features)
    foreground = ~detector.background
    # Each weight is the largest score of a shot left out of the others (folds of one here).
    for name in ("histogram", "colour", "location", "embedding"):
        loo = []
        for j in range(4):
            others = image_vectors(ImageParts.stack(refs[:j] + refs[j + 1:]), foreground, 48 * 48)
            loo.append(np.linalg.norm(others[name] - image_vectors(refs[j], foreground, 48 * 48)[name], axis=1).min())
        assert detector.normalisers[name] == pytest.approx(max(max(loo), 1e-6))
    test = scene(rng, [(RED, (28, 48))])
    raw, _, _ = detector.memory.scores(detector.compose([test], detector.backbone_network.embed([test]))[0][0], 0.02)
    total = sum(raw[s] / detector.normalisers[s] for s in WRITE_UP_SCORES)  # the words are not the write-up's
    assert detector.predict([test]).scores[0] == pytest.approx(total, rel=1e-6)
    missing_ratio = raw["histogram"] / detector.normalisers["histogram"]
    assert missing_ratio > 1  # a missing disc lies beyond every left-out shot


def test_segmentation_helpers():
    # Guided upsampling keeps constants constant and puts a feature step on the colour edge.
    lab = np.zeros((16, 16, 3), np.float32)
    lab[:, 8:, 1] = 60.0
    torch.testing.assert_close(guided_upsample(torch.full((2, 4, 4), 3.0), lab), torch.full((2, 16, 16), 3.0))
    step = torch.zeros(1, 4, 4)
    step[:, :, 2:] = 1.0
    sharp = guided_upsample(step, lab)[0]
    assert float(sharp[:, 7].max()) < 0.05 and float(sharp[:, 8].min()) > 0.95
    # The majority vote removes a lone pixel.
    labels = np.zeros((7, 7), int)
    labels[3, 3] = 1
    assert not majority_filter(labels, 2).any()
    # A frame touching every border is background; a frame covering most of the image is the part.
    frame = np.ones((20, 20), int)
    frame[2:-2, 2:-2] = 0  # 36 % of the image
    frame[8:12, 8:12] = 2
    assert background_classes([frame], 3).tolist() == [False, True, False]
    assert not background_classes([np.where(frame == 0, 1, frame)], 3).any()


def test_sam_votes_and_tiny_random_sam(tmp_path):
    part_map = np.array([[0, 0, 1], [0, 1, 1], [2, 2, 2]])
    regions = np.array([[0, 0, 0], [0, 0, -1], [1, 1, -1]])
    np.testing.assert_array_equal(vote_in_regions(part_map, regions, 3), [[0, 0, 0], [0, 0, 1], [2, 2, 2]])

    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    from defectlens.backbones.hf import ModelNotAvailable, load_sam
    from defectlens.models.composition.sam import SamRegions

    vision = SamVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                             patch_size=16, output_channels=16, global_attn_indexes=[1], window_size=2, mlp_dim=64, num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16)
    torch.manual_seed(0)
    SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())).save_pretrained(tmp_path / "sam")
    with pytest.raises(ModelNotAvailable, match="DEFECTLENS_SAM_MODEL"):
        load_sam(str(tmp_path / "missing"))
    sam = SamRegions(str(tmp_path / "sam"), points_per_side=4, min_quality=-np.inf, min_stability=-np.inf)
    regions = sam(normal(np.random.default_rng(0))[:80], 24)
    assert regions.shape == (24, 24) and regions.min() >= -1 and regions.max() < 16
    # The whole detector runs with SAM regions in the loop.
    rng = np.random.default_rng(0)
    detector = create_detector("composition", segmenter="sam", sam_model=str(tmp_path / "sam"), **PARAMS)
    prediction = detector.fit([normal(rng) for _ in range(2)]).predict([normal(rng)])
    assert np.isfinite(prediction.scores).all() and prediction.part_maps[0].shape == (SIZE, SIZE)


def test_benchmark_reports_part_maps_and_spro(tmp_path):
    from defectlens.data.generator import generate
    from defectlens.engine.benchmark import run_benchmark

    folder = generate(tmp_path, kind="loco", seed=0, size=64, n_train=3, n_test_good=2, n_test_defect_per_type=1)[0]
    result = run_benchmark(folder, method="composition", shots=[2], seeds=1, params={"size": 64, "part_size": 32, "parts": 4})
    metrics = result.runs[0]["metrics"]
    for block in ("all", "logical", "structural"):
        assert 0.0 <= metrics[block]["au_spro_0.05"] <= metrics[block]["au_spro_0.3"] + 1e-9 <= 1.0 + 1e-9
    assert {"au_spro_0.05", "au_spro_0.3[logical]"} <= set(result.summary[0])
    records = result.records
    assert all(r.extra_panels["parts"].shape == (64, 64, 3) for r in records)
    assert set(SCORES) == {"agnostic", "aware", "foreground", "embedding", "histogram", "colour", "location", "words",
                           "placement"}


def test_predict_report_shows_part_maps(tmp_path):
    from defectlens.cli import main

    rng = np.random.default_rng(1)
    good, test = tmp_path / "good", tmp_path / "test"
    good.mkdir(), test.mkdir()
    for i in range(3):
        cv2.imwrite(str(good / f"{i}.png"), normal(rng)[..., ::-1])
    cv2.imwrite(str(test / "missing.png"), scene(rng, [(RED, (28, 48))])[..., ::-1])
    model, report = tmp_path / "model.dlz", tmp_path / "report.html"
    params = [arg for key, value in PARAMS.items() if key != "size" for arg in ("--param", f"{key}={value}")]
    assert main(["fit", str(good), "-o", str(model), "--method", "composition", "--size", "96", *params]) == 0
    assert main(["predict", str(model), str(test), "--report", str(report)]) == 0
    html = report.read_text()
    assert html.count('alt="parts"') == 1 and html.count('alt="heatmap"') == 1
