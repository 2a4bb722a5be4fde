"""The k-shot benchmark engine on a method that is not a patch detector (the generic path)."""

from typing import ClassVar

import numpy as np
import pytest
import torch

from defectlens.data.io import as_image
from defectlens.engine.benchmark import run_benchmark
from defectlens.models.base import REGISTRY, Detector, LearningType, Prediction
from defectlens.models.params import SEED, Integer


class BrightnessDeviation(Detector):
    """Score = distance of the mean grey level from the normal images' mean; map = per-pixel
    deviation. A known answer for the engine to reproduce, not a method anyone should use."""

    name = "brightness_test"
    learning_type = LearningType.ZERO_SHOT
    predict_chunk = 3
    parameter_constraints = {"size": Integer(32, 2048), "seed": SEED}

    chunk_sizes: ClassVar[list[int]] = []  # every predict call's batch size, across instances

    def __init__(self, size: int = 256, seed: int = 0):
        self.size = size
        self.seed = seed

    def fit_images(self, images, masks, labels):
        grey = [as_image(i).mean() for i, label in zip(images, labels) if label == 0]
        self.reference = float(np.mean(grey)) if grey else 128.0
        self.anomalous_seen = labels.count(1)

    def predict_images(self, images):
        self.chunk_sizes.append(len(images))
        arrays = [as_image(i).astype(np.float32).mean(axis=2) for i in images]
        return Prediction(scores=np.array([abs(a.mean() - self.reference) for a in arrays]),
                          maps=[np.abs(a - self.reference) for a in arrays])


class BrightnessWithExamples(BrightnessDeviation):
    """The same, as a method that learns from a few real anomalies (their count a parameter)."""

    name = "brightness_examples_test"
    learning_type = LearningType.FEW_ANOMALIES
    parameter_constraints = {"anomalies": Integer(0, 100)}

    def __init__(self, anomalies: int = 0, size: int = 256, seed: int = 0):
        super().__init__(size=size, seed=seed)
        self.anomalies = anomalies


@pytest.fixture()
def registered():
    for cls in (BrightnessDeviation, BrightnessWithExamples):
        REGISTRY[cls.name] = cls
    BrightnessDeviation.chunk_sizes.clear()
    yield BrightnessDeviation
    for cls in (BrightnessDeviation, BrightnessWithExamples):
        del REGISTRY[cls.name]


def test_generic_path_fits_on_files_predicts_in_chunks_and_scores_like_a_direct_call(registered, synthetic_mvtec):
    from defectlens.data.datasets import load_dataset
    from defectlens.data.kshot import sample_shots
    from defectlens.engine.fit import normal_training_samples
    from defectlens.metrics import image_auroc

    dataset = load_dataset(synthetic_mvtec)
    test = [s for s in dataset.test if s.label in (0, 1)]
    result = run_benchmark(synthetic_mvtec, method=registered.name, shots=[0, 2], seeds=2)
    assert [(r["shots"], r["seed"]) for r in result.runs] == [(0, 0), (2, 0), (2, 1)]
    per_run = [3] * (len(test) // 3) + ([len(test) % 3] if len(test) % 3 else [])
    assert registered.chunk_sizes == per_run * 3

    picked = sample_shots(normal_training_samples(dataset), 2, 1)
    direct = registered().fit([s.path for s in picked]).predict([s.path for s in test])
    labels = np.array([s.label for s in test])
    assert result.runs[-1]["metrics"]["all"]["image_auroc"] == pytest.approx(image_auroc(labels, direct.scores))
    assert 0.0 <= result.runs[-1]["metrics"]["all"]["au_pro"] <= 1.0
    records = result.records
    assert len(records) == len(test) and all(r.anomaly_map.shape == r.mask.shape for r in records)


def test_zero_shots_is_refused_for_methods_that_need_normal_images(synthetic_mvtec):
    with pytest.raises(ValueError, match="zero-shot"):
        run_benchmark(synthetic_mvtec, method="patchcore", shots=[0, 1], seeds=1, params={"size": 64})


def test_real_anomaly_examples_are_learned_from_and_left_out_of_the_evaluation(registered, synthetic_mvtec):
    """`benchmark --method M --param anomalies=K` for methods that learn from a few anomalies:
    the training set takes K masked test anomalies, and each run evaluates without them."""
    from defectlens.data.datasets import load_dataset
    from defectlens.metrics import image_auroc

    dataset = load_dataset(synthetic_mvtec)
    test = [s for s in dataset.test if s.label in (0, 1)]
    result = run_benchmark(synthetic_mvtec, method=BrightnessWithExamples.name, shots=[2], seeds=2, params={"anomalies": 2})
    assert [len(r["from_test"]) for r in result.runs] == [2, 2]
    for run, record_seed in zip(result.runs, (0, 1)):
        detector = BrightnessWithExamples(anomalies=2, seed=record_seed)
        from defectlens.engine.fit import training_set

        training = training_set(dataset, detector.learning_type, 2, record_seed, anomalies=2)
        assert training.labels.count(1) == 2 and len(training.from_test) == 2
        training.fit(detector)
        assert detector.anomalous_seen == 2
        kept = [s for s in test if s.path not in training.from_test]
        direct = detector.predict([s.path for s in kept]).scores
        expected = image_auroc(np.array([s.label for s in kept]), direct)
        assert run["metrics"]["all"]["image_auroc"] == pytest.approx(expected)


@pytest.mark.parametrize("geometry", ["keep_aspect", "tiles"])
def test_patch_path_in_another_geometry_scores_like_a_direct_fit_and_predict(synthetic_mvtec, geometry):
    """The benchmark embeds once for all runs; in a non-square geometry the training images fix
    the layout first, and the result equals fitting and predicting the detector directly."""
    from defectlens.data.datasets import load_dataset
    from defectlens.metrics import image_auroc
    from defectlens.models import create_detector

    params = {"size": 64, "geometry": geometry, "bank_size": 256} | ({"tile_size": 64} if geometry == "tiles" else {})
    result = run_benchmark(synthetic_mvtec, method="patchcore", shots=["full"], seeds=1, params=params)
    dataset = load_dataset(synthetic_mvtec)
    test = [s for s in dataset.test if s.label in (0, 1)]
    direct = create_detector("patchcore", **params).fit([s.path for s in dataset.train if s.label == 0])
    expected = image_auroc(np.array([s.label for s in test]), direct.predict([s.path for s in test]).scores)
    assert result.runs[0]["metrics"]["all"]["image_auroc"] == pytest.approx(expected)


@pytest.mark.parametrize("method", ["ensemble", "padim", "patchcore", "patchknn", "spade"])
def test_scoring_in_blocks_of_images_is_scoring_all_at_once(method, normal_images, defect_image, monkeypatch):
    """The benchmark scores a tiled test set a block of images at a time to bound memory: an
    image's score and map must not depend on which other images share its block."""
    from defectlens.engine.benchmark import _score_in_blocks
    from defectlens.engine import benchmark as benchmark_module
    from defectlens.models import create_detector

    detector = create_detector(method, size=64).fit(normal_images[:4])
    features = detector.embed_images([*normal_images[4:], defect_image])
    whole_scores, whole_maps = detector.score_feature_batch(features)
    monkeypatch.setattr(benchmark_module, "SCORE_BLOCK_IMAGES", 2)  # blocks of 2, the last one partial
    scores, maps = _score_in_blocks(detector, features)
    np.testing.assert_allclose(scores, whole_scores, rtol=1e-5)
    torch.testing.assert_close(maps, whole_maps)
