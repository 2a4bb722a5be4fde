"""The generator's photo LOCO category: parts cut out of real photos, the assembly's rules, masks
from the geometry; refused clearly (or left out of "all") when the photos are absent."""

import importlib.util
import json

import cv2
import numpy as np
import pytest

from defectlens.data.generator import LOGICAL_DEFECTS, generate, render_pair
from defectlens.data.generator.dataset import PHOTOS_ENV
from defectlens.data.generator.loco_photo import PHOTO_CATEGORY, PHOTO_STRUCTURAL_DEFECTS
from defectlens.errors import UsageError

from conftest import SHARED

PHOTOS = SHARED / "datasets"
needs_photos = pytest.mark.skipif(
    not (PHOTOS / "bsdata" / "ball_screw").is_dir() or not (PHOTOS / "deeppcb" / "pcb").is_dir()
    or importlib.util.find_spec("elpv_dataset") is None,
    reason="needs ../shared/datasets (BSData, DeepPCB) and the elpv-dataset package")
TINY = dict(kind="loco", size=96, n_train=2, n_test_good=1, n_test_defect_per_type=1)


def test_without_photos_the_category_is_refused_by_name_and_left_out_of_all(tmp_path, monkeypatch):
    monkeypatch.delenv(PHOTOS_ENV, raising=False)
    with pytest.raises(UsageError, match="photos=DIR"):
        generate(tmp_path / "a", categories=[PHOTO_CATEGORY], **TINY)
    with pytest.raises(UsageError, match="is missing"):
        generate(tmp_path / "b", categories=[PHOTO_CATEGORY], photos=tmp_path, **TINY)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.warns(UserWarning, match=f"left out {PHOTO_CATEGORY}"):
        folders = generate(tmp_path / "c", categories="all", **TINY)
    assert [f.name for f in folders] == ["assembly"]


@needs_photos
@pytest.mark.parametrize("defect", LOGICAL_DEFECTS + PHOTO_STRUCTURAL_DEFECTS)
def test_masks_cover_the_changed_pixels(defect):
    clean, defective, mask = render_pair(PHOTO_CATEGORY, defect, seed=1, index=0, size=96, photos=PHOTOS)
    changed = np.any(clean != defective, axis=2)
    assert changed.any() and mask.any() and mask.mean() < 0.3
    if defect == "pitted_rod":  # the whole rod is cut from another photo; only its pit is the defect
        assert (mask & changed).sum() >= 0.5 * mask.sum()
    else:
        assert not (changed & ~mask).any(), "a pixel changed outside the mask"


@needs_photos
def test_layout_real_textures_and_same_bytes_again(tmp_path):
    first = generate(tmp_path / "a", categories=[PHOTO_CATEGORY], seed=2, photos=PHOTOS, **TINY)[0]
    again = generate(tmp_path / "b", categories=[PHOTO_CATEGORY], seed=2, photos=PHOTOS, **TINY)[0]
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    images = [f for f in files if f.parts[0] != "ground_truth"]
    assert len(images) == 2 + 1 + 1 + len(LOGICAL_DEFECTS) + len(PHOTO_STRUCTURAL_DEFECTS)
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    config = json.loads((first / "defects_config.json").read_text())
    assert {c["defect_name"] for c in config} == set(LOGICAL_DEFECTS) | set(PHOTO_STRUCTURAL_DEFECTS)
    # Two normal scenes never share textures: every part takes its own photo and crop.
    a, b = (cv2.imread(str(first / "train" / "good" / f"00{i}.png")) for i in (0, 1))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


@needs_photos
def test_wrong_colour_keeps_the_part_and_changes_its_hue():
    clean, defective, mask = render_pair(PHOTO_CATEGORY, "wrong_color", seed=0, index=1, size=96, photos=PHOTOS)
    changed = np.any(clean != defective, axis=2)
    before, after = clean[changed].astype(float).mean(0), defective[changed].astype(float).mean(0)
    # Same shape in place (changes inside the mask only), another colour: the mean RGB moves.
    assert np.linalg.norm(before - after) > 20
