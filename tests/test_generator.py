import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectlens.cli import main
from defectlens.data.generator import (
    DEFAULT_MVTEC_CATEGORIES,
    LOCO_STRUCTURAL_DEFECTS,
    LOGICAL_DEFECTS,
    MVTEC_CATEGORIES,
    STRUCTURAL_DEFECTS,
    generate,
    render_pair,
)
from defectlens.data.generator.loco import render_loco
from defectlens.data.generator.mvtec import render_mvtec
from defectlens.data.generator.render import expose

SMALL = dict(size=64, n_train=3, n_test_good=2, n_test_defect_per_type=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


def test_mvtec_layout_counts_and_masks(tmp_path):
    folders = generate(tmp_path, **SMALL)
    assert folders == [tmp_path / "fabric", tmp_path / "washer"]
    assert "seed=0" in (tmp_path / "README.txt").read_text()
    for folder in folders:
        assert len(list((folder / "train" / "good").glob("*.png"))) == 3
        assert len(list((folder / "test" / "good").glob("*.png"))) == 2
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(STRUCTURAL_DEFECTS)
        for defect in STRUCTURAL_DEFECTS:
            images = sorted((folder / "test" / defect).glob("*.png"))
            assert [p.name for p in images] == ["000.png", "001.png"]
            for image in images:
                mask = _gray(folder / "ground_truth" / defect / f"{image.stem}_mask.png")
                assert mask.shape == (64, 64) and mask.dtype == np.uint8
                assert set(np.unique(mask)) == {0, 255}
                assert _rgb(image).shape == (64, 64, 3)


def test_files_match_render_pair(tmp_path):
    # render_pair re-renders exactly what generate wrote, so tests on pairs speak for the files.
    generate(tmp_path, categories=["washer"], **SMALL)
    _, defective, mask = render_pair("washer", "crack", index=1, size=64)
    assert np.array_equal(_rgb(tmp_path / "washer" / "test" / "crack" / "001.png"), defective)
    assert np.array_equal(_gray(tmp_path / "washer" / "ground_truth" / "crack" / "001_mask.png") > 0, mask)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate(tmp_path / "a", **SMALL)
    generate(tmp_path / "b", **SMALL)
    generate(tmp_path / "c", seed=1, **SMALL)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != c[k] for k in images)


def test_every_category_generates_deterministically(tmp_path):
    tiny = dict(size=64, n_train=1, n_test_good=1, n_test_defect_per_type=1)
    folders = generate(tmp_path / "a", categories="all", **tiny)
    assert [f.name for f in folders] == list(MVTEC_CATEGORIES) and len(MVTEC_CATEGORIES) >= 10
    for folder in folders:
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(["good", *STRUCTURAL_DEFECTS])
        for defect in STRUCTURAL_DEFECTS:
            mask = _gray(folder / "ground_truth" / defect / "000_mask.png")
            assert set(np.unique(mask)) == {0, 255}, (folder.name, defect)
    generate(tmp_path / "b", categories="all", **tiny)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_category_does_not_depend_on_the_others_written(tmp_path):
    # New categories are opt-in: writing them alongside never changes the default categories' files.
    generate(tmp_path / "default", **SMALL)
    generate(tmp_path / "all", categories="all", **SMALL)
    for category in DEFAULT_MVTEC_CATEGORIES:
        assert _files(tmp_path / "default" / category) == _files(tmp_path / "all" / category)


@pytest.mark.parametrize("category", MVTEC_CATEGORIES)
def test_normal_images_vary(category):
    # Real parts vary in pose, texture phase and lighting: two normal images are never near copies.
    first, second = (render_mvtec(category, "train/good", i, 0, 64, None) for i in (0, 1))
    a, b = (expose(r.clean, r.light, r.noise).astype(float) for r in (first, second))
    assert np.abs(a - b).mean() > 3


def _global_features(image: np.ndarray) -> np.ndarray:
    """Colour statistics and edge energy: what a router sees of a whole image, blind to pose."""
    gray = image.mean(axis=2)
    gx, gy = np.abs(np.diff(gray, axis=1)).mean(), np.abs(np.diff(gray, axis=0)).mean()
    return np.concatenate([image.mean(axis=(0, 1)), image.std(axis=(0, 1)), [gx, gy]])


def test_categories_differ_in_global_appearance():
    # A product router works from global features: leave-one-out nearest neighbour on colour and
    # edge statistics of normal images must name every image's category.
    features, labels = [], []
    for category in MVTEC_CATEGORIES:
        for i in range(5):
            r = render_mvtec(category, "train/good", i, 0, 64, None)
            features.append(_global_features(expose(r.clean, r.light, r.noise).astype(float)))
            labels.append(category)
    x = np.array(features)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    distances = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    predicted = [labels[j] for j in distances.argmin(axis=1)]
    assert predicted == labels


def test_loco_layout_and_config(tmp_path):
    (folder,) = generate(tmp_path, kind="loco", size=96, n_train=4, n_test_good=2, n_test_defect_per_type=1)
    assert folder == tmp_path / "assembly"
    config = json.loads((folder / "defects_config.json").read_text())
    assert all(set(entry) == {"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"}
               for entry in config)
    values = {entry["pixel_value"] for entry in config}
    assert {entry["defect_name"] for entry in config} >= set(LOGICAL_DEFECTS) | set(LOCO_STRUCTURAL_DEFECTS)
    counts = {"train/good": 4, "validation/good": 1, "test/good": 2, "test/logical_anomalies": len(LOGICAL_DEFECTS),
              "test/structural_anomalies": len(LOCO_STRUCTURAL_DEFECTS)}
    for split, count in counts.items():
        assert len(list((folder / split).glob("*.png"))) == count, split
    assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == ["logical_anomalies", "structural_anomalies"]
    for kind in ("logical_anomalies", "structural_anomalies"):
        for image in (folder / "test" / kind).glob("*.png"):
            masks = sorted((folder / "ground_truth" / kind / image.stem).glob("*.png"))
            assert masks and masks[0].name == "000.png"
            for path in masks:
                mask = _gray(path)
                assert mask.shape == (96, 96)
                used = set(np.unique(mask)) - {0}
                assert len(used) == 1 and used <= values


CASES = [(c, d) for c in MVTEC_CATEGORIES for d in STRUCTURAL_DEFECTS]
CASES += [("assembly", d) for d in LOGICAL_DEFECTS + LOCO_STRUCTURAL_DEFECTS]


@pytest.mark.parametrize("category,defect", CASES)
def test_mask_covers_exactly_the_changed_pixels(category, defect):
    for index in range(2):
        clean, defective, mask = render_pair(category, defect, seed=3, index=index, size=96)
        changed = np.any(clean != defective, axis=2)
        assert changed.any() and mask.any()
        assert not (changed & ~mask).any(), "a pixel changed outside the mask"
        if category != "assembly":  # LOCO masks a missing part by its whole compartment
            assert (changed & mask).sum() >= 0.3 * mask.sum(), "the mask is mostly unchanged pixels"
        assert mask.mean() < 0.25


def test_good_images_have_no_defect():
    scene = render_mvtec("fabric", "train/good", 0, 0, 64, None)
    assert scene.masks == [] and scene.defective is scene.clean
    loco = render_loco("train/good", 0, 0, 64, None)
    assert loco.masks == []


def test_refuses_to_overwrite(tmp_path):
    generate(tmp_path, categories=["fabric"], **SMALL)
    stale = tmp_path / "fabric" / "stale.txt"
    stale.write_text("old")
    with pytest.raises(FileExistsError, match="fabric"):
        generate(tmp_path, categories=["fabric"], **SMALL)
    assert stale.exists()
    generate(tmp_path, categories=["fabric"], overwrite=True, **SMALL)
    assert not stale.exists()
    assert len(list((tmp_path / "fabric" / "train" / "good").glob("*.png"))) == 3


def test_refuses_to_overwrite_a_readme_it_did_not_write(tmp_path):
    (tmp_path / "README.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match="README.txt"):
        generate(tmp_path, categories=["fabric"], **SMALL)
    assert (tmp_path / "README.txt").read_text() == "my notes" and not (tmp_path / "fabric").exists()
    generate(tmp_path, categories=["fabric"], **SMALL, overwrite=True)
    generate(tmp_path, categories=["washer"], **SMALL)  # its own README is rewritten without asking
    assert "Categories: washer" in (tmp_path / "README.txt").read_text()


def test_cli_generate_categories(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--categories", "capsule,wood", "--size", "64"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.txt", "capsule", "wood"]
    assert len(list((tmp_path / "capsule" / "test" / "hole").glob("*.png"))) == 8
    assert main(["generate", str(tmp_path / "x"), "--categories", "carpet"]) == 2
    assert "unknown categories ['carpet']" in capsys.readouterr().err
    (tmp_path / "a file").write_text("the user's")
    assert main(["generate", str(tmp_path / "a file"), "--categories", "wood", "--size", "64"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # a typo, not a scene: refused before anything is drawn
    assert main(["generate", str(tmp_path / "huge"), "--categories", "wood", "--size", "100000"]) == 2
    assert "from 64 to 4096" in capsys.readouterr().err and not (tmp_path / "huge").exists()
    assert main(["generate", str(tmp_path / "twice"), "--categories", "wood,wood", "--size", "64"]) == 0
    assert capsys.readouterr().out.count("wood") == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        generate("unused", kind="visa")
    with pytest.raises(ValueError, match="categories"):
        generate("unused", categories=["carpet"])
    with pytest.raises(ValueError, match="defect"):
        render_pair("fabric", "dent")
