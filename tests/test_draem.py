"""DRAEM and the shared training pieces: losses (focal, weak box), the synthetic batch sampler,
training, the model file, maps at image size."""

import math

import numpy as np
import pytest
import torch

from defectlens.models import Detector, create_detector
from defectlens.models.trained.geometry import working_shape
from defectlens.models.trained.losses import box_loss, focal_loss, pixel_weights
from defectlens.models.trained.sampler import AnomalySampler
from defectlens.synthesis import AnoGenSynthesizer, create_synthesizer

TINY = {"size": 64, "crop": 32, "batch_size": 4, "steps": 10, "width": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def focal_by_hand(logit: float, target: int, gamma: float = 2.0) -> float:
    p_true = 1 / (1 + math.exp(-logit)) if target else 1 / (1 + math.exp(logit))
    return (1 - p_true) ** gamma * -math.log(p_true)


def test_focal_loss_matches_its_formula():
    logits = torch.tensor([[-3.0, -0.5, 0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    expected = [focal_by_hand(x, int(t)) for x, t in zip(logits[0].tolist(), target[0].tolist())]
    np.testing.assert_allclose(focal_loss(logits, target)[0].numpy(), expected, rtol=1e-5)


def test_box_loss_is_zero_inside_the_box_where_the_model_already_says_normal():
    # One row of pixels: the box covers columns 1-4. The model calls columns 1 and 2 normal with
    # p = 0.95 and 0.73 (logits -3, -1), column 3 undecided, column 4 anomalous; columns 0 and 5
    # are outside the box, one of them wrongly anomalous.
    logits = torch.tensor([[[[2.0, -3.0, -1.0, 0.0, 1.5, -2.0]]]])
    box = torch.tensor([[[[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]]])
    loss = box_loss(logits, box, normal_threshold=0.6)[0, 0, 0].numpy()
    expected = [focal_by_hand(2.0, 0), 0.0, 0.0, focal_by_hand(0.0, 1), focal_by_hand(1.5, 1), focal_by_hand(-2.0, 0)]
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=0)
    # A stricter threshold ignores only the confident pixel; above 1 nothing is ignored.
    strict = box_loss(logits, box, normal_threshold=0.9)[0, 0, 0].numpy()
    assert strict[1] == 0 and strict[2] == pytest.approx(focal_by_hand(-1.0, 1), rel=1e-5)
    np.testing.assert_allclose(box_loss(logits, box, normal_threshold=2.0).numpy(), focal_loss(logits, box).numpy())


def test_only_weak_samples_get_box_weights():
    logits = torch.full((2, 1, 2, 2), -4.0)  # everything confidently normal
    target = torch.ones(2, 1, 2, 2)
    weights = pixel_weights(logits, target, torch.tensor([False, True]), normal_threshold=0.5)
    assert weights[0].eq(1).all() and weights[1].eq(0).all()


def test_working_shape_keeps_aspect_and_pixel_budget():
    assert working_shape(460, 1130, 256) == (160, 416)  # BSData
    assert working_shape(300, 300, 256) == (256, 256)
    h, w = working_shape(100, 1000, 64)
    assert h % 32 == 0 and w % 32 == 0 and h >= 32


def test_sampler_makes_perlin_and_box_labelled_anomalies(normal_images, defect_image):
    mask = np.zeros(defect_image.shape[:2], bool)
    mask[80:100, 30:50] = True
    sampler = AnomalySampler(normal_images, crop=64, seed=0, generator=AnoGenSynthesizer([defect_image], [mask]))
    batch = sampler.batch(48)
    assert batch.clean.shape == batch.augmented.shape == (48, 3, 64, 64) and batch.target.shape == (48, 1, 64, 64)
    has_target = batch.target.flatten(1).amax(1) > 0
    changed = (batch.augmented - batch.clean).abs().flatten(1).amax(1) > 0
    assert 10 < int(has_target.sum()) < 40  # about half the crops carry an anomaly
    assert bool(batch.weak.any()) and bool((has_target & ~batch.weak).any())  # both kinds
    assert not changed[~has_target].any()  # crops without a target are untouched
    for index in torch.nonzero(batch.weak)[:, 0]:  # a box target is one filled rectangle
        ys, xs = torch.nonzero(batch.target[index, 0], as_tuple=True)
        assert batch.target[index, 0, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].eq(1).all()


def test_cutpaste_source_puts_exact_masks_on_the_crops(normal_images):
    sampler = AnomalySampler(normal_images, crop=64, seed=0, crop_source=create_synthesizer("cutpaste"))
    batch = sampler.batch(48)
    changed = (batch.augmented - batch.clean).abs().amax(1) > 0
    assert not batch.weak.any()
    # Every changed pixel is in the target: Perlin and CutPaste both know their masks.
    assert not (changed & (batch.target[:, 0] == 0)).any()


class RecordingSampler(AnomalySampler):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingSampler.made.append(self)


def test_diffusion_source_end_to_end_on_a_tiny_stable_diffusion(normal_images, defect_image, tmp_path, monkeypatch):
    """anomaly_source=diffusion: textual inversion on the real anomaly, a pool of box-guided
    generated anomalies, training with their boxes, a detector that predicts and saves."""
    pytest.importorskip("diffusers")
    from test_synthesis import tiny_parts

    parts = tiny_parts()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(parts, name).save_pretrained(tmp_path / "sd" / name)
    monkeypatch.setattr("defectlens.models.trained.detector.AnomalySampler", RecordingSampler)
    mask = np.zeros(defect_image.shape[:2], bool)
    mask[80:100, 30:50] = True
    params = {**TINY, "anomaly_source": "diffusion", "sd_model": str(tmp_path / "sd"), "generated": 3,
              "diffusion_size": 16, "diffusion_steps": 2, "embedding_steps": 2}
    detector = create_detector("draem", **params)
    detector.fit([*normal_images, defect_image], masks=[None] * 6 + [mask], labels=[0] * 6 + [1])
    sampler = RecordingSampler.made[-1]
    assert len(sampler.pool) == 3 and all(anomaly.kind == "diffusion" for _, anomaly in sampler.pool)
    for index, anomaly in sampler.pool:
        x0, y0, x1, y1 = anomaly.box
        outside = np.ones(anomaly.mask.shape, bool)
        outside[y0:y1, x0:x1] = False
        assert (anomaly.image != sampler.normals[index]).any(axis=2)[~outside].any()
        assert not (anomaly.image != sampler.normals[index]).any(axis=2)[outside].any()
    assert sampler.batch(32).weak.any()  # generated anomalies train with their boxes
    assert detector.real_anomalies == 1 and len(detector.losses) == TINY["steps"]
    loaded = Detector.load(detector.save(tmp_path / "draem.dlmodel"))
    assert loaded.anomaly_source == "diffusion"
    np.testing.assert_allclose(loaded.predict(normal_images[:2]).scores, detector.predict(normal_images[:2]).scores)


def test_short_training_lowers_the_loss(normal_images):
    torch.manual_seed(0)
    detector = create_detector("draem", width=4)
    sampler = AnomalySampler(normal_images, crop=32, seed=1)
    fixed = sampler.batch(8)
    with torch.no_grad():
        before = float(detector.batch_loss(fixed, 0.5))
    detector.batch_size = 4
    detector.train_networks(sampler, steps=20)
    with torch.no_grad():
        after = float(detector.batch_loss(fixed, 0.5))
    assert after < 0.8 * before, (before, after)


@pytest.fixture(scope="module")
def fitted(normal_images):
    return create_detector("draem", **TINY).fit(normal_images)


def test_few_normals_all_train_and_set_no_threshold(fitted):
    # Fewer than 13 normal images could not hold out the three scores a threshold needs: all train.
    assert fitted.normal_scores is None and fitted.threshold is None and fitted.map_range is None
    assert len(fitted.losses) == TINY["steps"]


def test_real_anomalies_go_through_fit_and_are_counted(normal_images, defect_image, tmp_path):
    mask = np.zeros(defect_image.shape[:2], bool)
    mask[80:100, 30:50] = True
    detector = create_detector("draem", anomalies=1, **TINY)
    detector.fit(normal_images[:4] + [defect_image], masks=[None] * 4 + [mask], labels=[0] * 4 + [1])
    assert detector.real_anomalies == 1
    assert Detector.load(detector.save(tmp_path / "m.dlmodel")).real_anomalies == 1
    with pytest.raises(ValueError, match="anomalies=1"):
        create_detector("draem", anomalies=1, **TINY).fit(normal_images[:4])
    with pytest.raises(ValueError, match="mask"):
        create_detector("draem", **TINY).fit(normal_images[:4] + [defect_image], labels=[0] * 4 + [1])


def test_a_single_normal_image_trains_without_threshold(normal_images):
    detector = create_detector("draem", **{**TINY, "steps": 2}).fit(normal_images[:1])
    assert detector.threshold is None and detector.normal_scores is None
