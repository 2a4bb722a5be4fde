"""Few-shot augmentation of the normal training images (models/augment.py, PatchDetector)."""

import numpy as np
import pytest
import torch

from defectlens.models import Detector, create_detector
from defectlens.models.augment import AUGMENTS, augmented_copies, augments
from defectlens.models.patch import PatchDetector, subset_views


def numbered(shape) -> np.ndarray:
    """An image whose every pixel value is distinct, so each transform gives a different array."""
    return np.arange(np.prod(shape), dtype=np.int64).reshape(shape)


def test_flips_are_the_two_mirror_images():
    image = numbered((4, 4, 3))
    left_right, up_down = augmented_copies(image, "flips")
    assert np.array_equal(left_right[:, 0], image[:, 3]) and np.array_equal(left_right[:, 3], image[:, 0])
    assert np.array_equal(up_down[0], image[3]) and np.array_equal(up_down[3], image[0])


def test_turns_of_a_square_image_are_90_180_270_degrees():
    image = numbered((3, 3))
    turned = augmented_copies(image, "rot90")
    # 90° counter-clockwise: the top row becomes the left column, read upwards.
    assert np.array_equal(turned[0], [[2, 5, 8], [1, 4, 7], [0, 3, 6]])
    assert np.array_equal(turned[1], image[::-1, ::-1])
    assert np.array_equal(turned[2], [[6, 3, 0], [7, 4, 1], [8, 5, 2]])


def test_flips_and_turns_give_the_seven_other_symmetries_of_the_square():
    image = numbered((5, 5, 2))
    copies = augmented_copies(image, "flips+rot90")
    dihedral = [np.rot90(image, k) for k in range(4)] + [np.rot90(image[:, ::-1], k) for k in range(4)]
    keys = {c.tobytes() for c in copies}
    assert len(copies) == 7 == len(keys)
    assert keys == {d.tobytes() for d in dihedral[1:]}  # all but the image itself


def test_a_wide_image_keeps_its_shape_no_quarter_turns():
    image = numbered((40, 100))
    for augment in ("rot90", "flips+rot90", "all"):
        assert all(copy.shape == image.shape for copy in augmented_copies(image, augment))
    assert [c.tobytes() for c in augmented_copies(image, "rot90")] == [image[::-1, ::-1].tobytes()]
    assert len(augmented_copies(image, "flips+rot90")) == 3  # two mirrors and the half turn


def test_shifts_move_the_content_by_a_32nd_of_the_side_with_mirrored_borders():
    image = numbered((64, 96)).astype(np.float32)
    right, left, down, up = augmented_copies(image, "shifts")
    dx, dy = 3, 2  # 96 / 32, 64 / 32
    assert np.array_equal(right[:, dx:], image[:, :-dx]) and np.array_equal(right[:, 0], image[:, dx])
    assert np.array_equal(left[:, :-dx], image[:, dx:])
    assert np.array_equal(down[dy:], image[:-dy]) and np.array_equal(up[:-dy], image[dy:])
    assert len(augmented_copies(image, "all")) == 3 + 4  # a wide image: 3 symmetries + 4 shifts


def test_augmentation_applies_to_a_few_images_only():
    assert not augments("none", 16, 4)
    assert augments("flips", 16, 16) and not augments("flips", 16, 17)
    with pytest.raises(ValueError, match="augment must be one of"):
        augmented_copies(numbered((4, 4)), "jitter")
    assert set(AUGMENTS) >= {"none", "flips", "rot90", "flips+rot90", "shifts", "all"}


class Recorder(PatchDetector):
    """Remembers the feature rows of every fit and of every scored batch (no backbone needed)."""

    name = "recorder_test"

    def fit_features(self, features):
        self.fits = [*getattr(self, "fits", []), features.clone()]

    def score_features(self, features):
        self.scored = [*getattr(self, "scored", []), features.clone()]
        return features.mean(dim=1)


def _rows(features: torch.Tensor) -> set[float]:
    """Each image's tag (all its values are one number)."""
    return {float(f.flatten()[0]) for f in features}


def test_a_held_out_image_never_has_its_copies_in_the_memory_it_is_scored_against():
    # Image i is filled with i, its copies with 10 i + 1 and 10 i + 2: tags tell where a row came from.
    features = torch.stack([torch.full((2, 3, 3), float(i)) for i in range(4)])
    views = (torch.stack([torch.full((2, 3, 3), 10.0 * i + c) for i in range(4) for c in (1, 2)]),
             np.repeat(np.arange(4), 2))
    detector = Recorder(augment="flips")
    detector.fit_from_features(features, views=views)
    assert len(detector.fits) == 5  # 4 leave-one-out folds, then the final fit
    for fitted, scored in zip(detector.fits[:4], detector.scored):
        (held,) = _rows(scored)
        kept = {i for i in range(4) if i != held}
        assert _rows(fitted) == kept | {10.0 * i + c for i in kept for c in (1, 2)}
    assert _rows(detector.fits[-1]) == set(range(4)) | {10.0 * i + c for i in range(4) for c in (1, 2)}
    assert detector.threshold is not None


def test_subset_views_renumbers_sources_to_positions_in_the_subset():
    views = (torch.arange(6.0), np.array([0, 0, 1, 2, 2, 3]))
    chosen, sources = subset_views(views, np.array([1, 3]))
    assert chosen.tolist() == [2.0, 5.0] and sources.tolist() == [0, 1]
    assert subset_views(None, np.array([0])) is None


def plain_images(count: int, side: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (side, side, 3), dtype=np.uint8) for _ in range(count)]


def test_the_memory_holds_the_copies_of_a_few_shots_and_not_of_many():
    images = plain_images(3)
    plain = create_detector("patchcore", size=64, bank_size=10**6, reweight_neighbours=0).fit(images)
    flipped = create_detector("patchcore", size=64, bank_size=10**6, reweight_neighbours=0, augment="flips").fit(images)
    assert flipped.bank.shape[0] == 3 * plain.bank.shape[0]  # each image and its two mirrors, every patch kept
    many = create_detector("patchcore", size=64, bank_size=10**6, reweight_neighbours=0, augment="flips",
                           augment_max_images=2).fit(images)
    assert many.bank.shape[0] == plain.bank.shape[0]


def test_augment_is_stored_in_the_model_file(tmp_path):
    detector = create_detector("padim", size=64, feature_dims=8, augment="rot90", augment_max_images=4)
    detector.fit(plain_images(3))
    loaded = Detector.load(detector.save(tmp_path / "fewshot.safetensors"))
    assert loaded.get_params()["augment"] == "rot90" and loaded.get_params()["augment_max_images"] == 4
    image = plain_images(1, seed=5)
    np.testing.assert_allclose(loaded.predict(image).scores, detector.predict(image).scores, rtol=1e-5)


def test_the_benchmark_path_scores_like_a_direct_fit_with_augmentation(synthetic_mvtec):
    """The benchmark shares one feature pass and embeds only the copies of each run's shots;
    the result equals fitting the detector directly on those shots."""
    from defectlens.data.datasets import load_dataset
    from defectlens.engine.benchmark import run_benchmark
    from defectlens.engine.fit import training_set
    from defectlens.metrics import image_auroc
    from defectlens.models import LearningType

    params = {"size": 64, "bank_size": 256, "augment": "shifts"}
    result = run_benchmark(synthetic_mvtec, method="patchcore", shots=[3], seeds=[1], params=params)
    dataset = load_dataset(synthetic_mvtec)
    shots = training_set(dataset, LearningType.NORMAL, 3, 1).images
    direct = create_detector("patchcore", seed=1, **params).fit(shots)
    assert result.runs[0]["threshold"] == pytest.approx(direct.threshold)
    test = [s for s in dataset.test if s.label in (0, 1)]
    expected = image_auroc(np.array([s.label for s in test]), direct.predict([s.path for s in test]).scores)
    assert result.runs[0]["metrics"]["all"]["image_auroc"] == pytest.approx(expected)


def test_winclip_plus_memorises_the_copies_of_its_shots(tiny_clip):
    """WinCLIP+ with augment: a mirrored shot is as familiar as the shot itself (visual
    association 0, so the fused score is half the language-only score)."""
    rng = np.random.default_rng(7)
    shots = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(3)]
    detector = create_detector("winclip", clip_model=tiny_clip, object_name="ball_screw", size=48, augment="flips").fit(shots)
    assert detector.banks["patch"].shape[0] == 3 * 3 * 36  # 3 shots and their 2 mirrors, 6×6 patches each
    assert detector.threshold is not None
    language = create_detector("winclip", clip_model=tiny_clip, object_name="ball_screw", size=48).fit([])
    mirrored = [np.ascontiguousarray(shots[0][:, ::-1])]
    assert np.allclose(detector.predict(mirrored).scores, language.predict(mirrored).scores / 2, atol=1e-5)
