import numpy as np
import pytest
import torch

from defectlens.models import Detector, create_detector
from defectlens.models.gcad.networks import AutoEncoder, GlobalRegressor, Student

# Tiny networks: every test here trains in seconds on 2 cores.
TINY = {"size": 64, "dims": 8, "width": 8, "bottleneck": 8, "lr": 3e-3}


@pytest.mark.parametrize("receptive_field", [48, 80])
def test_student_cells_see_exactly_their_own_patch(receptive_field):
    """Unpadded convolutions: a crop gives exactly the cells of the whole image (what makes
    training on crops equivalent), and a change reaches exactly the cells whose patch it touches."""
    torch.manual_seed(0)
    student = Student(dims=4, width=8, receptive_field=receptive_field).eval()
    image = torch.randn(1, 3, 128, 128)
    border = 2 * student.pad
    with torch.no_grad():
        cells = student(student.padded(image))
        assert cells.shape == (1, 4, 16, 16)
        crop = student.padded(image)[:, :, 8 * 5 : 8 * 13 + border, 8 * 2 : 8 * 8 + border]
        np.testing.assert_allclose(student(crop), cells[:, :, 5:13, 2:8], atol=1e-5)
        changed = image.clone()
        changed[:, :, 100:, 100:] += 5.0
        moved = student(student.padded(changed))
    differs = (moved - cells).abs().amax(dim=1)[0] > 1e-6
    # Cell j's patch spans pixels [8j + 4 - rf/2, 8j + 4 + rf/2): it reaches pixel 100 from this cell on.
    first = (96 - receptive_field // 2) // 8 + 1
    assert differs[first:, first:].all() and not differs[:first].any() and not differs[:, :first].any()
    with pytest.raises(ValueError, match="multiple of 16"):
        Student(dims=4, receptive_field=40)


def test_autoencoder_output_fits_the_grid_and_passes_through_the_bottleneck():
    torch.manual_seed(0)
    autoencoder = AutoEncoder(dims=5, bottleneck=3, width=8).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert autoencoder(images, (12, 12)).shape == (2, 5, 12, 12)
        code = autoencoder.encoder(torch.nn.functional.interpolate(images, size=(128, 128)))
    assert code.shape == (2, 3)


def test_global_regressor_reaches_across_the_image_and_keeps_detail_through_skips():
    """The paper's U-Net: output on the stride-8 grid; a change in one corner moves cells beyond
    a 48-px student's reach (its cells 8 and 9 see pixels up to 100 at most); the stride-8 skip carries detail the coarse
    levels lose (zeroing it changes the output)."""
    torch.manual_seed(0)
    unet = GlobalRegressor(dims=4, width=8).eval()
    image = torch.randn(1, 3, 128, 128)
    changed = image.clone()
    changed[:, :, 112:, 112:] += 5.0
    with torch.no_grad():
        cells = unet(image)
        assert cells.shape == (1, 4, 16, 16)
        assert (unet(changed) - cells)[..., 8:10, 8:10].abs().amax() > 0  # a student's: exactly 0
        skip = unet.down[0](unet.stem(image))
        deeper = unet.down[2](unet.down[1](skip))
        up = unet.up[0](torch.cat([torch.nn.functional.interpolate(deeper, size=(8, 8), mode="bilinear"),
                                   unet.down[1](skip)], 1))
        without_skip = unet.out(unet.up[1](torch.cat([torch.nn.functional.interpolate(up, size=(16, 16), mode="bilinear"),
                                                      torch.zeros_like(skip)], 1)))
        with_skip = unet.out(unet.up[1](torch.cat([torch.nn.functional.interpolate(up, size=(16, 16), mode="bilinear"),
                                                   skip], 1)))
    torch.testing.assert_close(with_skip, cells)
    assert not torch.allclose(without_skip, cells)


def test_unet_global_branch_trains_and_round_trips(normal_images, tmp_path):
    detector = create_detector("gcad", steps=30, global_network="unet", **TINY).fit(normal_images[:4])
    assert isinstance(detector.global_student, GlobalRegressor)
    first, last = detector.losses[:5].mean(0), detector.losses[-5:].mean(0)
    assert last[2] < first[2], (first, last)
    loaded = Detector.load(detector.save(tmp_path / "gcad.dlmodel"))
    np.testing.assert_allclose(loaded.predict(normal_images[4:]).scores, detector.predict(normal_images[4:]).scores, rtol=1e-5)


def test_training_lowers_the_losses(normal_images):
    detector = create_detector("gcad", steps=40, **TINY).fit(normal_images[:4])
    losses = detector.losses
    assert losses.shape == (40, 3)
    first, last = losses[:5].mean(0), losses[-5:].mean(0)
    assert last[0] < 0.7 * first[0] and last[1] < 0.85 * first[1], (first, last)


def test_projection_keeps_leading_components_at_unit_average_variance():
    detector = create_detector("gcad", dims=3, **{k: v for k, v in TINY.items() if k != "dims"})
    generator = torch.Generator().manual_seed(0)
    # 6 channels: two strong, correlated ones, four of noise; scales differ wildly.
    base = torch.randn(8, 1, 16, 16, generator=generator)
    features = torch.cat([base * 100, base * 3 + 0.01 * torch.randn(8, 1, 16, 16, generator=generator),
                          torch.randn(8, 4, 16, 16, generator=generator) * torch.tensor([1.0, 10, 0.1, 5]).view(1, 4, 1, 1)], 1)
    detector._fit_projection(features)
    projected = detector._project(features)
    assert projected.shape == (8, 3, 16, 16)
    assert projected.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert projected.var(dim=(0, 2, 3)).mean() == pytest.approx(1.0, rel=0.02)
    # Channels 0 and 1 are one signal at different scales: after standardising, the leading
    # component weighs them equally and the noise channels hardly at all.
    first = detector.components[:, 0].abs().tolist()
    assert first[0] == pytest.approx(first[1], rel=0.02) and max(first[2:]) < 0.1 * first[0]
    with pytest.raises(ValueError, match="dims=7"):
        create_detector("gcad", dims=7)._fit_projection(features)


def test_defect_scores_above_normal_and_the_map_peaks_on_it(normal_images, defect_image):
    # One altered copy per image: random textures in rotated copies need more steps than a test has.
    detector = create_detector("gcad", **{**TINY, "size": 128}, steps=80, augment=1).fit(normal_images[:5])
    prediction = detector.predict([normal_images[5], defect_image])
    assert prediction.maps.shape == (2, 128, 128)
    assert prediction.scores[1] > prediction.scores[0]
    assert prediction.scores[1] > detector.predict(normal_images[:5]).scores.max()
    peak = np.unravel_index(np.argmax(prediction.maps[1]), prediction.maps[1].shape)
    assert 72 <= peak[0] <= 108 and 22 <= peak[1] <= 58, f"map peak {peak} is not on the defect"


def test_maps_come_back_at_each_images_own_size(normal_images):
    detector = create_detector("gcad", steps=2, **TINY).fit(normal_images[:1])
    assert detector.threshold is None and detector.normal_scores is None  # nothing to hold out
    wide = np.full((90, 200, 3), 120, np.uint8)
    prediction = detector.predict([normal_images[0], wide])
    assert [m.shape for m in prediction.maps] == [(128, 128), (90, 200)]
    assert prediction.scores.shape == (2,) and np.isfinite(prediction.scores).all()


def test_fit_without_images_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one"):
        create_detector("gcad").fit([])


def test_k_shot_benchmark_on_a_loco_set_runs_through_fit_and_predict(tmp_path):
    from defectlens.data.generator import generate
    from defectlens.engine.benchmark import run_benchmark

    folder = generate(tmp_path, kind="loco", seed=1, size=64, n_train=3, n_test_good=2, n_test_defect_per_type=1)[0]
    result = run_benchmark(folder, method="gcad", shots=[1, 2], seeds=1, params=TINY | {"steps": 3})
    # One or two shots hold out one image (and a copy): never the three scores a threshold needs.
    assert [(run["shots"], run["threshold"] is None) for run in result.runs] == [(1, True), (2, True)]
    metrics = result.runs[1]["metrics"]
    assert {"logical", "structural"} <= set(metrics)
    assert 0.0 <= metrics["logical"]["image_auroc"] <= 1.0 and "au_pro" in metrics["all"]


def test_few_images_get_more_altered_copies_that_keep_the_originals_first(normal_images):
    detector = create_detector("gcad", **TINY)
    assert [detector._copies(n) for n in (1, 2, 6, 31, 40, 400)] == [7, 7, 5, 1, 1, 1]
    assert create_detector("gcad", augment=0)._copies(1) == 0
    images = np.stack(normal_images[:2])
    augmented = detector._augmented(images, 3)
    assert augmented.shape == (8, *images.shape[1:]) and augmented.dtype == np.uint8
    np.testing.assert_array_equal(augmented[:2], images)
    for copy, original in zip(augmented[2:], np.tile(images, (3, 1, 1, 1))):
        assert not np.array_equal(copy, original)
        assert abs(copy.mean() / original.mean() - 1) < 0.3  # lighting changes stay small
    np.testing.assert_array_equal(detector._augmented(images, 3), augmented)  # seeded


def test_few_images_calibrate_maps_on_altered_copies_and_set_no_threshold(normal_images):
    detector = create_detector("gcad", **(TINY | {"steps": 2})).fit(normal_images[:2])
    assert detector.threshold is None and detector.normal_scores is None and detector.map_range is not None
    thirteen = normal_images + [np.ascontiguousarray(image[::-1]) for image in normal_images] + [normal_images[0][:, ::-1]]
    held_out = create_detector("gcad", **(TINY | {"steps": 2})).fit(thirteen).normal_scores
    assert len(held_out) == 3  # a fifth of 13, no copies