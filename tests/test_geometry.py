"""Input geometry of the patch detectors: keep_aspect shapes, tile layout, stitched maps."""

import numpy as np
import pytest
import torch

from defectlens.models import Detector, create_detector
from defectlens.models.patch import _stacked, aspect_shape, tile_origins


def plain_images(count: int, shape: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Featureless gray images with a little sensor noise."""
    rng = np.random.default_rng(seed)
    return [np.clip(128 + rng.normal(0, 2, (*shape, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def test_keep_aspect_input_of_a_wide_image_keeps_its_aspect_and_pixel_count():
    detector = create_detector("padim", size=256, geometry="keep_aspect", feature_dims=8)
    detector.fit(plain_images(3, (460, 1130)))
    height, width = detector.canvas_hw
    assert (height, width) == aspect_shape(460, 1130, 256, 16) == (160, 400)
    assert height % 16 == 0 and width % 16 == 0
    assert abs(height * width / 256**2 - 1) < 0.05
    features = detector.embed_images(plain_images(1, (460, 1130)))
    assert features.shape[2:] == (height // 8, width // 8)
    assert detector.predict(plain_images(1, (460, 1130))).maps.shape == (1, 460, 1130)


@pytest.mark.parametrize("length, tile, overlap", [(1130, 256, 0.25), (460, 256, 0.5), (256, 256, 0.25), (300, 64, 0.0)])
def test_tiles_cover_the_image_exactly_with_at_least_the_overlap(length, tile, overlap):
    origins = tile_origins(length, tile, overlap)
    assert origins[0] == 0 and origins[-1] + tile == length
    steps = np.diff(origins)
    assert np.all(steps <= tile * (1 - overlap) + 1)


def test_tiling_stitches_the_map_peak_onto_the_defect():
    shape = (128, 224)
    detector = create_detector("patchcore", size=64, geometry="tiles", tile_overlap=0.25, bank_size=256,
                               reweight_neighbours=0, blur_sigma=2.0)
    detector.fit(plain_images(4, shape))
    assert detector.canvas_hw == shape  # native resolution: no resize
    image = plain_images(1, shape, seed=9)[0]
    image[80:90, 150:160] = 20  # a small dark pit
    prediction = detector.predict([image])
    peak = np.unravel_index(np.argmax(prediction.maps[0]), shape)
    assert 72 <= peak[0] <= 98 and 142 <= peak[1] <= 168
    assert prediction.scores[0] > detector.threshold


def test_tiles_layout_is_stored_in_the_model_file(tmp_path):
    detector = create_detector("patchknn", size=64, geometry="tiles", tile_size=96, bank_size=128)
    detector.fit(plain_images(3, (130, 200)))
    loaded = Detector.load(detector.save(tmp_path / "tiles.safetensors"))
    assert loaded.canvas_hw == detector.canvas_hw == (130, 200)
    assert loaded.get_params()["geometry"] == "tiles" and loaded.tile_size == 96
    image = plain_images(1, (130, 200), seed=3)
    np.testing.assert_allclose(loaded.predict(image).scores, detector.predict(image).scores, rtol=1e-5)


def test_patchknn_scores_a_tiled_image_by_one_tiles_share_of_patches_unless_told_a_fraction(tmp_path):
    """Default: the mean of the top 1 % of one tile's patches, so a small defect is not averaged
    away as the tiles multiply; an explicit top_fraction (a model file written before the default
    existed holds 0.01) keeps its share of all the image's patches."""
    shape = (128, 384)  # 3 rows × 8 tiles of 64 at overlap 0.25, 8 × 8 patches each: 1536 patches
    detector = create_detector("patchknn", size=64, geometry="tiles", bank_size=None).fit(plain_images(3, shape))
    assert detector.tiles_per_image == len(detector._tiles()) > 1
    image = plain_images(1, shape, seed=7)
    patch_map = detector.score_feature_batch(detector.embed_images(image))[1].flatten()
    positions = patch_map.numel()
    for top_fraction, count in ((None, round(0.01 * positions / detector.tiles_per_image)), (0.05, round(0.05 * positions))):
        detector.top_fraction = top_fraction
        expected = patch_map.topk(max(1, count)).values.mean().item()
        assert detector.score_feature_batch(detector.embed_images(image))[0][0] == pytest.approx(expected, rel=1e-6)
        assert detector.predict(image, maps=False).scores[0] == pytest.approx(expected, rel=1e-5)
    detector.top_fraction = 0.01
    loaded = Detector.load(detector.save(tmp_path / "old.safetensors"))
    assert loaded.top_fraction == 0.01
    assert loaded.predict(image).scores[0] == pytest.approx(patch_map.topk(round(0.01 * positions)).values.mean().item(), rel=1e-5)


@pytest.mark.parametrize("shape, canvas, tiles", [((40, 80), (64, 128), 3),     # smaller: scaled up to one tile
                                                  ((76, 150), (64, 126), 3),    # within the slack: down to one
                                                  ((80, 80), (64, 64), 1),
                                                  ((81, 160), (81, 160), 6)])   # beyond it: native
def test_the_short_side_within_the_slack_of_a_tile_becomes_one_tile(shape, canvas, tiles):
    detector = create_detector("padim", size=64, geometry="tiles", feature_dims=8)
    detector.fit(plain_images(3, shape))
    assert detector.canvas_hw == canvas and len(detector._tiles()) == tiles
    assert detector.predict(plain_images(1, shape)).maps.shape == (1, *shape)


def test_tiles_above_the_pixel_cap_are_cut_from_the_shrunk_image():
    detector = create_detector("padim", size=64, geometry="tiles", tile_max_pixels=128 * 256, feature_dims=8)
    detector.fit(plain_images(3, (200, 400)))
    assert detector.canvas_hw == (128, 256) and len(detector._tiles()) == 3 * 5
    assert detector.predict(plain_images(1, (200, 400))).maps.shape == (1, 200, 400)
    native = create_detector("padim", size=64, geometry="tiles", tile_max_pixels=None, feature_dims=8)
    native.fit(plain_images(3, (200, 400)))
    assert native.canvas_hw == (200, 400)


@pytest.mark.parametrize("total", [None, 3, 5, 2])
def test_tile_features_are_stacked_in_one_tensor_whatever_the_count_given(total):
    """The tiled features go straight into one tensor sized by ``total`` (no list stacked at
    the end); a wrong count still gives every tensor, in order."""
    tensors = [torch.full((2, 3), float(i)) for i in range(3)]
    stacked = _stacked(iter(tensors), total)
    assert torch.equal(stacked, torch.stack(tensors))
    assert _stacked(iter([]), total).numel() == 0


def test_large_tiled_features_live_in_a_temporary_file_that_goes_with_them(tmp_path, monkeypatch):
    """Above DISK_BACKED_BYTES the tiled features are a mapped, already unlinked file in
    DEFECTLENS_SCRATCH: the same numbers as in memory, and the space is freed with the tensor."""
    import gc

    from defectlens.models import patch

    images = plain_images(3, (81, 160))
    detector = create_detector("padim", size=64, geometry="tiles", feature_dims=8)
    in_memory = detector.embed_images(images, fit=True, total=3)
    monkeypatch.setenv("DEFECTLENS_SCRATCH", str(tmp_path))
    monkeypatch.setattr(patch, "DISK_BACKED_BYTES", in_memory.numel())  # 4 bytes an element: over it
    on_disk = detector.embed_images(images, fit=True, total=3)
    assert torch.equal(on_disk, in_memory)
    maps = open("/proc/self/maps").read()
    assert str(tmp_path) in maps and list(tmp_path.iterdir()) == []  # mapped, with no name left
    del on_disk
    gc.collect()
    assert str(tmp_path) not in open("/proc/self/maps").read()


def test_no_room_for_disk_backed_features_is_an_error_that_says_where(tmp_path, monkeypatch):
    import errno
    import os

    from defectlens.models import patch

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setenv("DEFECTLENS_SCRATCH", str(tmp_path))
    monkeypatch.setattr(patch, "DISK_BACKED_BYTES", 0)
    monkeypatch.setattr(patch.os, "posix_fallocate", full)
    detector = create_detector("padim", size=64, geometry="tiles", feature_dims=8)
    with pytest.raises(OSError, match=f"in {tmp_path} .*set DEFECTLENS_SCRATCH"):
        detector.embed_images(plain_images(2, (81, 160)), fit=True, total=2)
