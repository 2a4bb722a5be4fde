"""The k-shot benchmark engine on a method that is not a patch detector (the generic path)."""

from typing import ClassVar

import numpy as np
import pytest

from defectlens.data.io import as_image
from defectlens.engine.benchmark import run_benchmark
from defectlens.models.base import REGISTRY, Detector, Prediction


class BrightnessDeviation(Detector):
    """Score = distance of the mean grey level from the normal images' mean; map = per-pixel
    deviation. A known answer for the engine to reproduce, not a method anyone should use."""

    name = "brightness_test"
    zero_shot = True
    predict_chunk = 3

    chunk_sizes: ClassVar[list[int]] = []  # every predict call's batch size, across instances

    def __init__(self, size: int = 256, seed: int = 0):
        super().__init__(size=size, seed=seed)

    def fit(self, images, masks=None, labels=None):
        grey = [as_image(i).mean() for i in images]
        self.reference = float(np.mean(grey)) if grey else 128.0
        return self

    def predict(self, images):
        self.chunk_sizes.append(len(images))
        arrays = [as_image(i).astype(np.float32).mean(axis=2) for i in images]
        return Prediction(scores=np.array([abs(a.mean() - self.reference) for a in arrays]),
                          maps=[np.abs(a - self.reference) for a in arrays])


@pytest.fixture()
def registered():
    REGISTRY[BrightnessDeviation.name] = BrightnessDeviation
    BrightnessDeviation.chunk_sizes.clear()
    yield BrightnessDeviation
    del REGISTRY[BrightnessDeviation.name]


def test_generic_path_fits_on_files_predicts_in_chunks_and_scores_like_a_direct_call(registered, synthetic_mvtec):
    from defectlens.data.datasets import load_dataset
    from defectlens.data.kshot import sample_shots
    from defectlens.engine.fit import normal_training_samples
    from defectlens.metrics import image_auroc

    dataset = load_dataset(synthetic_mvtec)
    test = [s for s in dataset.test if s.label in (0, 1)]
    result = run_benchmark(synthetic_mvtec, method=registered.name, shots=[0, 2], seeds=2)
    assert [(r["shots"], r["seed"]) for r in result["runs"]] == [(0, 0), (2, 0), (2, 1)]
    per_run = [3] * (len(test) // 3) + ([len(test) % 3] if len(test) % 3 else [])
    assert registered.chunk_sizes == per_run * 3

    picked = sample_shots(normal_training_samples(dataset), 2, 1)
    direct = registered().fit([s.path for s in picked]).predict([s.path for s in test])
    labels = np.array([s.label for s in test])
    assert result["runs"][-1]["metrics"]["all"]["image_auroc"] == pytest.approx(image_auroc(labels, direct.scores))
    assert 0.0 <= result["runs"][-1]["metrics"]["all"]["au_pro"] <= 1.0
    records = result["_records"]
    assert len(records) == len(test) and all(r.anomaly_map.shape == r.mask.shape for r in records)


def test_zero_shots_is_refused_for_methods_that_need_normal_images(synthetic_mvtec):
    with pytest.raises(ValueError, match="zero-shot"):
        run_benchmark(synthetic_mvtec, method="patchcore", shots=[0, 1], seeds=1, size=64)
