"""DeSTSeg: the frozen teacher, the denoising student, the segmentation head on cosine features,
training, the model file, maps at image size, real anomalies through fit_from_folder."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectlens.engine.fit import fit_from_folder
from defectlens.models import create_detector
from defectlens.models.destseg.model import cosine_distance, cosine_features
from defectlens.models.trained import AnomalySampler

TINY = {"size": 64, "crop": 32, "batch_size": 4, "steps": 10, "width": 4, "seg_width": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_teacher_taps_strides_4_8_16_and_the_student_answers_each():
    detector = create_detector("destseg", width=4)
    images = torch.rand(2, 3, 64, 96)
    teacher = detector.teacher(images)
    assert [t.shape[1:] for t in teacher] == [(24, 16, 24), (40, 8, 12), (112, 4, 6)]
    student = detector._student(images)
    assert [s.shape for s in student] == [t.shape for t in teacher]
    assert not any(p.requires_grad for p in detector.teacher.parameters())


def test_cosine_features_sum_to_the_cosine_similarity_and_distance_is_zero_on_identical_features():
    generator = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 5, 8, 8, generator=generator), torch.randn(2, 7, 4, 4, generator=generator)]
    student = [torch.randn(2, 5, 8, 8, generator=generator), torch.randn(2, 7, 4, 4, generator=generator)]
    features = cosine_features(teacher, student)
    assert features.shape == (2, 12, 8, 8)
    np.testing.assert_allclose(features[:, :5].sum(1).numpy(), F.cosine_similarity(teacher[0], student[0], dim=1).numpy(), atol=1e-5)
    assert float(cosine_distance(teacher, teacher)) == pytest.approx(0.0, abs=1e-5)
    assert float(cosine_distance(teacher, [-t for t in teacher])) == pytest.approx(4.0, abs=1e-4)  # 2 scales × (1 - (-1))


def test_short_training_lowers_both_losses(normal_images):
    torch.manual_seed(0)
    detector = create_detector("destseg", width=4, seg_width=8, batch_size=4, lr=3e-3)
    sampler = AnomalySampler(normal_images, crop=32, seed=1)
    fixed = sampler.batch(8)
    untrained_head = copy.deepcopy(detector.segmentation.state_dict())
    with torch.no_grad():
        student_before = float(detector.student_loss(fixed))
    detector.train_networks(sampler, steps=50)  # 20 student steps, then 30 segmentation steps
    detector.segmentation.train()
    with torch.no_grad():
        student_after = float(detector.student_loss(fixed))
        head_after = float(detector.segmentation_loss(fixed, 0.5))
        detector.segmentation.load_state_dict(untrained_head)
        head_before = float(detector.segmentation_loss(fixed, 0.5))  # same trained student, untrained head
    assert student_after < 0.8 * student_before, (student_before, student_after)
    assert head_after < 0.8 * head_before, (head_before, head_after)


@pytest.fixture(scope="module")
def fitted(normal_images):
    return create_detector("destseg", **TINY).fit(normal_images)


def test_model_file_does_not_store_the_pretrained_teacher(fitted):
    assert not any(key.startswith("teacher") for key in fitted.state_tensors())


def test_fit_from_folder_picks_real_anomalies_when_asked(synthetic_mvtec):
    detector, training = fit_from_folder(synthetic_mvtec, method="destseg", params={**TINY, "steps": 4, "anomalies": 2})
    assert training.normal_count == 8 and training.labels.count(1) == 2 and len(training.from_test) == 2
    assert detector.real_anomalies == 2
    plain, _ = fit_from_folder(synthetic_mvtec, method="destseg", params={**TINY, "steps": 4})
    assert plain.real_anomalies == 0
