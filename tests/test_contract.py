"""The Detector contract, checked on every registered method (in the spirit of scikit-learn's
check_estimator): parameters, fit -> predict shapes at each image's own size, finite scores, the
threshold's meaning, the model file round trip, accepted input kinds and empty input.

Each method gets one tiny configuration; a method added to models/ without one fails here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import textured_image
from defectlens.models import REGISTRY, Detector, LearningType, ParameterError, create_detector
from defectlens.models.calibration import MIN_SCORES
from defectlens.errors import UsageError
from defectlens.models.modelfile import describe_model_file

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 64
#: Tiny, fast configurations; CLIP methods get their tiny CLIP folder added below.
TINY = {
    "patchcore": {"size": SIDE, "bank_size": 64},
    "padim": {"size": SIDE, "feature_dims": 16},
    "spade": {"size": SIDE, "neighbour_images": 2},
    "patchknn": {"size": SIDE, "bank_size": 256},
    "ensemble": {"size": SIDE, "members": ["patchknn", "padim"],
                 "member_params": {"patchknn": {"bank_size": 256}, "padim": {"feature_dims": 16}}},
    "musc": {"size": SIDE, "references": None},
    "composition": {"size": SIDE, "parts": 4, "part_size": 32},
    "gcad": {"size": SIDE, "steps": 2, "dims": 8, "width": 8, "bottleneck": 8, "batch_size": 2},
    "draem": {"size": SIDE, "crop": 32, "batch_size": 2, "steps": 2, "width": 4},
    "destseg": {"size": SIDE, "crop": 32, "batch_size": 2, "steps": 2, "width": 4, "seg_width": 8},
    "winclip": {"size": 48},
    "faprompt": {"size": 32, "top_patches": 4, "prompts": 3, "steps": 2, "batch_size": 4},
    "unified": {"size": SIDE, "bank_size": 64},
    "iuf": {"size": SIDE, "dims": 8, "heads": 2, "layers": 1, "steps": 3, "batch_size": 4, "kept": 4},
}
METHODS = sorted(REGISTRY)
#: Enough normal images for every calibration rule to hold some out (held_out_split needs 13).
NORMALS = 14


def test_every_registered_method_has_a_tiny_configuration():
    assert set(TINY) == set(REGISTRY)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    normal = [textured_image(rng, SIDE) for _ in range(NORMALS)]
    anomalous = []
    for k in range(2):
        image = textured_image(rng, SIDE).copy()
        image[10 + 20 * k : 24 + 20 * k, 20:34] = (250, 40, 40)
        anomalous.append(image)
    return normal, anomalous


def params_of(method: str, request) -> dict:
    params = dict(TINY[method])
    if method == "winclip":
        params["clip_model"] = request.getfixturevalue("tiny_clip")
    if method == "faprompt":
        params["clip_model"] = request.getfixturevalue("tiny_prompt_clip")
    return params


def fit_inputs(cls, images) -> tuple[list, list | None, list | None]:
    """What each learning type fits on: normal images, plus labelled anomalies with masks."""
    normal, anomalous = images
    if cls.learning_type in (LearningType.FEW_ANOMALIES, LearningType.AUXILIARY):
        masks = [None] * len(normal) + [np.all(a == (250, 40, 40), axis=2) for a in anomalous]
        return normal + anomalous, masks, [0] * len(normal) + [1] * len(anomalous)
    return normal, None, None


@pytest.fixture(scope="module", params=METHODS)
def fitted(request, images):
    method = request.param
    params = params_of(method, request)
    detector = create_detector(method, **params)
    before = detector.get_params()
    inputs, masks, labels = fit_inputs(type(detector), images)
    detector.fit(inputs, masks=masks, labels=labels)
    return method, params, before, detector


def test_fit_never_changes_a_parameter(fitted):
    _, params, before, detector = fitted
    assert detector.get_params() == before
    assert {k: detector.get_params()[k] for k in params} == params


def test_maps_at_each_images_own_size_and_finite_scores(fitted, images):
    _, _, _, detector = fitted
    normal, anomalous = images
    wide = np.ascontiguousarray(np.concatenate([normal[0], normal[1][:, :32]], axis=1))  # 64 × 96
    batch = [normal[2], wide, anomalous[0]]
    prediction = detector.predict(batch)
    assert prediction.scores.shape == (3,) and np.isfinite(prediction.scores).all()
    assert [np.shape(m) for m in prediction.maps] == [(64, 64), (64, 96), (64, 64)]
    assert all(np.isfinite(m).all() for m in prediction.maps)
    same = detector.predict([normal[2], anomalous[0]])
    assert isinstance(same.maps, np.ndarray) and same.maps.shape == (2, 64, 64) and same.maps.dtype == np.float32


def test_threshold_comes_from_held_out_normal_scores(fitted):
    _, _, _, detector = fitted
    if detector.predict_chunk is None:  # transductive: set from each predicted batch
        return
    if detector.normal_scores is None or len(detector.normal_scores) < MIN_SCORES:
        assert detector.threshold is None
        return
    assert math.isfinite(detector.threshold)
    # Below 100 held-out scores a 1 % false-alarm rate cannot be resolved empirically: no
    # held-out normal image may be flagged.
    assert (np.asarray(detector.normal_scores) <= detector.threshold).all()
    low, high = detector.map_range
    assert math.isfinite(low) and math.isfinite(high) and high >= low


def test_save_load_gives_identical_predictions(fitted, images, tmp_path):
    method, _, _, detector = fitted
    normal, anomalous = images
    batch = [normal[3], normal[4], anomalous[1]]
    before = detector.predict(batch)
    path = detector.save(tmp_path / f"{method}.dlmodel")
    loaded = Detector.load(path)
    after = loaded.predict(batch)
    as_stored = json.loads(json.dumps(detector.get_params()))  # the model file holds JSON: tuples come back as lists
    assert type(loaded) is type(detector) and loaded.get_params() == as_stored
    assert loaded.threshold == detector.threshold and loaded.map_range == detector.map_range
    info = describe_model_file(path)  # what `defectlens info` shows, read without building the detector
    assert info["method"] == method and info["params"] == as_stored and info["threshold"] == detector.threshold
    held_out = np.zeros(0) if detector.normal_scores is None else np.asarray(detector.normal_scores, np.float64)
    assert info["normal_scores"]["count"] == int(np.isfinite(held_out).sum())
    np.testing.assert_allclose(after.scores, before.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(after.maps), np.asarray(before.maps), rtol=1e-4, atol=1e-5)


def test_a_pickled_or_copied_detector_predicts_the_same(fitted, images):
    import copy
    import pickle

    _, _, _, detector = fitted
    batch = [images[0][3], images[1][1]]
    before = detector.predict(batch, maps=False).scores
    for twin in (pickle.loads(pickle.dumps(detector)), copy.deepcopy(detector)):
        np.testing.assert_allclose(twin.predict(batch, maps=False).scores, before, rtol=1e-5, atol=1e-6)


def test_float_gray_and_rgba_inputs_score_like_their_rgb_versions(fitted, images):
    _, _, _, detector = fitted
    normal, anomalous = images
    gray = normal[5][..., 0]
    batch = [normal[6], anomalous[0], np.repeat(gray[..., None], 3, axis=2)]
    reference = detector.predict(batch).scores
    rgba = np.concatenate([anomalous[0], np.full((*anomalous[0].shape[:2], 1), 255, np.uint8)], axis=2)
    variants = detector.predict([normal[6].astype(np.float32) / 255.0, rgba, gray]).scores
    np.testing.assert_allclose(variants, reference, rtol=1e-4, atol=1e-5)


def test_empty_input_gives_an_empty_prediction(fitted):
    _, _, _, detector = fitted
    prediction = detector.predict([])
    assert prediction.scores.shape == (0,) and len(prediction.maps) == 0


@pytest.mark.parametrize("method", METHODS)
def test_parameters_are_named_constrained_and_checked(method):
    cls = REGISTRY[method]
    names = cls.get_param_names()
    assert set(names) == set(cls.constraints()), "every parameter needs a constraint"
    defaults = cls()
    defaults.validate_params()
    assert cls(**defaults.get_params()).get_params() == defaults.get_params()
    with pytest.raises(ParameterError, match=rf"{method} has no parameter bank_sise; it takes: .*seed"):
        create_detector(method, bank_sise=10)
    with pytest.raises(TypeError):
        cls(bank_sise=10)
    with pytest.raises(ParameterError, match="seed must be an integer"):
        create_detector(method, seed="abc")
    with pytest.raises(ParameterError, match=r"size must be an integer >= 32 and <= 2048, not 100000"):
        create_detector(method, size=100000)
    with pytest.raises(ParameterError, match="size must be"):
        create_detector(method, size=0)
    with pytest.raises(ParameterError):
        cls().set_params(seed=-1)


def test_unfitted_detector_refuses_to_predict_and_to_save(tmp_path):
    detector = create_detector("patchcore")
    with pytest.raises(RuntimeError, match="call fit"):
        detector.predict([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(RuntimeError, match="fit before saving"):
        detector.save(tmp_path / "m.dlmodel")


@pytest.mark.parametrize("method", ["patchcore", "musc"])
def test_one_image_instead_of_a_list_and_an_empty_image_are_clear_errors(method, images, tmp_path):
    from PIL import Image

    detector = create_detector(method, size=64)
    if method != "musc":
        detector.fit(images[0][:3])
    path = tmp_path / "one.png"
    Image.fromarray(images[0][0]).save(path)
    for one in (images[0][0], images[0][0][..., 0], str(path), path, Image.fromarray(images[0][0])):
        with pytest.raises(UsageError, match="pass \\["):
            detector.predict(one)
    with pytest.raises(UsageError, match="pass \\["):
        create_detector(method, size=64).fit(images[0][0])
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5), np.float32)):
        with pytest.raises(ValueError, match="holds no pixel"):
            detector.predict([empty, images[0][1]])


def test_numpy_numbers_as_parameters_and_rates(images):
    with pytest.raises(ParameterError, match="plain Python number"):
        create_detector("patchcore", size=np.int64(64)).fit(images[0][:3])
    detector = create_detector("patchcore", size=64).fit(images[0][:6])
    assert detector.set_operating_point(np.float32(0.05)) == pytest.approx(detector.set_operating_point(0.05), rel=1e-6)


def test_a_parameter_changed_after_fit_needs_a_fit_again(images, tmp_path):
    """The bank was learned with the old parameters: predicting or saving with the new ones would
    mix them (a cosine bank saved as L2 flagged every image after loading)."""
    detector = create_detector("patchknn", size=64).fit(images[0][:4])
    detector.set_params(metric="cosine", size=64)  # the values it has: still fitted
    detector.predict(images[0][:1])
    detector.set_params(metric="l2")
    with pytest.raises(RuntimeError, match="call fit"):
        detector.predict(images[0][:1])
    with pytest.raises(RuntimeError, match="fit before saving"):
        detector.save(tmp_path / "m.dlmodel")
    assert not (tmp_path / "m.dlmodel").exists()
    detector.fit(images[0][:4]).save(tmp_path / "m.dlmodel")
    with pytest.raises(UsageError, match="is a folder"):
        detector.save(tmp_path)
