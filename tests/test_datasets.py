"""Dataset loaders on tiny fake trees of each layout, k-shot sampling, and the real BSData set."""

import json
from pathlib import Path

import pytest
from PIL import Image

from defectlens.data.datasets import Dataset, Sample, detect_kind, load_dataset
from defectlens.data.kshot import sample_shots, shot_plan

BALL_SCREW = Path(__file__).resolve().parents[2] / "shared/datasets/bsdata/ball_screw"


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (128, 128, 128)).save(path)
    return path


def _images(folder: Path, names) -> None:
    for name in names:
        _image(folder / name)


# ---- MVTec AD -------------------------------------------------------------------------------


def _mvtec(root: Path) -> Path:
    _images(root / "train/good", ["000.png", "001.png", "002.png"])
    (root / "train/good/._000.png").write_bytes(b"macOS metadata")  # must be ignored
    _images(root / "test/good", ["000.png", "001.png"])
    _images(root / "test/scratch", ["001.png", "000.png"])
    _images(root / "test/crack", ["000.png"])
    _images(root / "ground_truth/scratch", ["000_mask.png", "001_mask.png"])
    _images(root / "ground_truth/crack", ["000_mask.png"])
    return root


def test_mvtec_counts_labels_and_masks(tmp_path):
    root = _mvtec(tmp_path / "bottle")
    assert detect_kind(root) == "mvtec"
    data = load_dataset(root)
    assert isinstance(data, Dataset)
    assert (data.kind, data.category, data.root) == ("mvtec", "bottle", root)
    assert [s.path.name for s in data.train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_paths == () for s in data.train)
    assert data.validation == [] and data.defects_config is None
    assert [(s.defect_type, s.path.name) for s in data.test] == [
        ("crack", "000.png"),
        ("good", "000.png"),
        ("good", "001.png"),
        ("scratch", "000.png"),
        ("scratch", "001.png"),
    ]
    for sample in data.test:
        assert sample.logical is None
        if sample.defect_type == "good":
            assert sample.label == 0 and sample.mask_paths == ()
        else:
            assert sample.label == 1
            assert sample.mask_paths == (root / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png",)


def test_mvtec_is_deterministic(tmp_path):
    root = _mvtec(tmp_path / "bottle")
    assert load_dataset(root) == load_dataset(root, kind="mvtec")


def test_mvtec_missing_mask_names_the_image(tmp_path):
    root = _mvtec(tmp_path / "bottle")
    (root / "ground_truth/scratch/001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"scratch[/\\]001\.png: no ground-truth mask.*001_mask\.png"):
        load_dataset(root)


def test_mvtec_without_train_good_is_a_clear_error(tmp_path):
    _images(tmp_path / "odd/test/good", ["0.png"])
    with pytest.raises(ValueError, match="odd: no train/good folder; expected an MVTec-style category folder"):
        load_dataset(tmp_path / "odd", kind="mvtec")


def test_dataset_root_with_category(tmp_path):
    _mvtec(tmp_path / "mvtec/bottle")
    _mvtec(tmp_path / "mvtec/cable")
    assert load_dataset(tmp_path / "mvtec", category="cable").category == "cable"
    with pytest.raises(ValueError, match="several dataset categories.*bottle, cable.*category="):
        load_dataset(tmp_path / "mvtec")
    with pytest.raises(ValueError, match="no category folder 'screw' \\(found: bottle, cable\\)"):
        load_dataset(tmp_path / "mvtec", category="screw")


def test_missing_root_and_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="nowhere: does not exist"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset kind 'mvtec_ad'"):
        load_dataset(tmp_path, kind="mvtec_ad")


# ---- MVTec LOCO -----------------------------------------------------------------------------

DEFECTS_CONFIG = [
    {"defect_name": "missing_banana", "pixel_value": 255, "saturation_threshold": 1, "relative_saturation": True},
    {"defect_name": "broken_box", "pixel_value": 254, "saturation_threshold": 400, "relative_saturation": False},
]


def _loco(root: Path, config=True) -> Path:
    _images(root / "train/good", ["000.png", "001.png"])
    _images(root / "validation/good", ["000.png"])
    _images(root / "test/good", ["000.png"])
    _images(root / "test/logical_anomalies", ["000.png", "001.png"])
    _images(root / "test/structural_anomalies", ["000.png"])
    _images(root / "ground_truth/logical_anomalies/000", ["001.png", "000.png"])
    _images(root / "ground_truth/logical_anomalies/001", ["000.png"])
    _images(root / "ground_truth/structural_anomalies/000", ["000.png"])
    if config:
        (root / "defects_config.json").write_text(json.dumps(DEFECTS_CONFIG))
    return root


def test_loco_splits_masks_and_logical_flags(tmp_path):
    root = _loco(tmp_path / "breakfast_box")
    assert detect_kind(root) == "loco"
    data = load_dataset(root)
    assert (data.kind, data.category) == ("loco", "breakfast_box")
    assert len(data.train) == 2 and len(data.validation) == 1
    assert all(s.label == 0 for s in data.train + data.validation)
    assert data.defects_config == DEFECTS_CONFIG
    by_key = {(s.defect_type, s.path.stem): s for s in data.test}
    assert sorted(by_key) == [
        ("good", "000"),
        ("logical_anomalies", "000"),
        ("logical_anomalies", "001"),
        ("structural_anomalies", "000"),
    ]
    good = by_key["good", "000"]
    assert (good.label, good.logical, good.mask_paths) == (0, None, ())
    multi = by_key["logical_anomalies", "000"]
    assert (multi.label, multi.logical) == (1, True)
    gt = root / "ground_truth/logical_anomalies/000"
    assert multi.mask_paths == (gt / "000.png", gt / "001.png")
    assert len(by_key["logical_anomalies", "001"].mask_paths) == 1
    structural = by_key["structural_anomalies", "000"]
    assert (structural.label, structural.logical) == (1, False)


def test_loco_detected_by_either_marker(tmp_path):
    only_folder = _loco(tmp_path / "a", config=False)
    assert detect_kind(only_folder) == "loco"
    assert load_dataset(only_folder).defects_config is None
    only_config = tmp_path / "b"
    _images(only_config / "train/good", ["0.png"])
    (only_config / "defects_config.json").write_text("[]")
    assert detect_kind(only_config) == "loco"


def test_loco_missing_masks_and_bad_config(tmp_path):
    root = _loco(tmp_path / "box")
    for mask in (root / "ground_truth/logical_anomalies/001").iterdir():
        mask.unlink()
    with pytest.raises(ValueError, match=r"logical_anomalies[/\\]001\.png: no ground-truth masks"):
        load_dataset(root)
    root = _loco(tmp_path / "box2")
    (root / "defects_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="defects_config.json: cannot read defects config"):
        load_dataset(root)
    (root / "defects_config.json").write_text('{"defect_name": "x"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_dataset(root)


def test_loco_unexpected_test_folder(tmp_path):
    root = _loco(tmp_path / "box")
    _images(root / "test/scratch", ["0.png"])
    with pytest.raises(ValueError, match="scratch: unexpected test folder; expected one of good, logical_anomalies"):
        load_dataset(root)


# ---- VisA -----------------------------------------------------------------------------------


def _visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for category in ("candle", "capsules"):
        for index in range(3):
            name = f"{category}/Data/Images/Normal/{index:04d}.JPG"
            _image(root / name)
            rows.append(f"{category},{'train' if index < 2 else 'test'},normal,{name},")
        for index in range(2):
            name = f"{category}/Data/Images/Anomaly/{index:03d}.JPG"
            mask = f"{category}/Data/Masks/Anomaly/{index:03d}.png"
            _image(root / name)
            _image(root / mask)
            rows.append(f"{category},test,anomaly,{name},{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def _check_candle(data: Dataset, root: Path) -> None:
    assert (data.kind, data.category, data.root) == ("visa", "candle", root)
    assert [s.path.name for s in data.train] == ["0000.JPG", "0001.JPG"]
    assert all(s.label == 0 and s.defect_type == "good" for s in data.train)
    assert data.validation == []
    labels = [(s.label, s.defect_type, s.path.name) for s in data.test]
    assert labels == [(1, "anomaly", "000.JPG"), (1, "anomaly", "001.JPG"), (0, "good", "0002.JPG")]
    for sample in data.test:
        expected = (root / f"candle/Data/Masks/Anomaly/{sample.path.stem}.png",) if sample.label else ()
        assert sample.mask_paths == expected


def test_visa_from_root_category_folder_and_csv(tmp_path):
    root = _visa(tmp_path / "VisA")
    assert detect_kind(root) == "visa"
    assert detect_kind(root / "candle") == "visa"
    _check_candle(load_dataset(root, category="candle"), root)
    _check_candle(load_dataset(root / "candle"), root)
    _check_candle(load_dataset(root / "split_csv/1cls.csv", category="candle"), root)
    assert load_dataset(root, kind="visa", category="capsules").category == "capsules"


def test_visa_needs_a_known_category(tmp_path):
    root = _visa(tmp_path / "VisA")
    with pytest.raises(ValueError, match="1cls.csv: holds several objects \\(candle, capsules\\); pass category="):
        load_dataset(root)
    with pytest.raises(ValueError, match="no rows for category 'pcb1'"):
        load_dataset(root, category="pcb1")


def test_visa_bad_rows_name_the_line(tmp_path):
    root = _visa(tmp_path / "VisA")
    (root / "candle/Data/Images/Anomaly/001.JPG").unlink()
    with pytest.raises(ValueError, match=r"1cls\.csv, line 6: image .*001\.JPG does not exist"):
        load_dataset(root, category="candle")
    csv_path = root / "split_csv/1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("normal", "fine", 1))
    with pytest.raises(ValueError, match="line 2: label 'fine'; expected normal or anomaly"):
        load_dataset(root, category="candle")


def test_visa_csv_beside_images(tmp_path):
    # A CSV stored next to the images with paths relative to its own folder.
    _image(tmp_path / "imgs/a.png")
    _image(tmp_path / "imgs/b.png")
    _image(tmp_path / "masks/b.png")
    (tmp_path / "split.csv").write_text(
        "object,split,label,image,mask\nwidget,train,normal,imgs/a.png,\nwidget,test,anomaly,imgs/b.png,masks/b.png\n"
    )
    data = load_dataset(tmp_path / "split.csv")
    assert (data.category, data.root, len(data.train), len(data.test)) == ("widget", tmp_path, 1, 1)
    assert data.test[0].mask_paths == (tmp_path / "masks/b.png",)


# ---- plain folder ---------------------------------------------------------------------------


def test_unlabelled_folder_is_recursive(tmp_path):
    _images(tmp_path / "shots", ["b.png", "a.jpg", "day2/c.bmp"])
    (tmp_path / "shots/readme.txt").write_text("not an image")
    assert detect_kind(tmp_path / "shots") == "folder"
    data = load_dataset(tmp_path / "shots")
    assert (data.kind, data.category, data.train, data.validation) == ("folder", "shots", [], [])
    assert [s.path.relative_to(tmp_path / "shots").as_posix() for s in data.test] == ["a.jpg", "b.png", "day2/c.bmp"]
    assert all(s.label == -1 and s.mask_paths == () for s in data.test)


def test_labelled_folder_uses_good_and_defect_folders(tmp_path):
    _images(tmp_path / "parts", ["good/1.png", "good/2.png", "dent/1.png", "dent/deep/2.png", "scratch/1.png"])
    data = load_dataset(tmp_path / "parts", kind="folder")
    labels = sorted((s.defect_type, s.label) for s in data.test)
    assert labels == [("dent", 1), ("dent", 1), ("good", 0), ("good", 0), ("scratch", 1)]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images found"):
        load_dataset(tmp_path / "empty")


# ---- k-shot ---------------------------------------------------------------------------------


def _samples(count: int) -> list[Sample]:
    return [Sample(Path(f"train/good/{index:03d}.png"), 0, "good") for index in range(count)]


def test_sample_shots_is_reproducible_and_a_subset():
    train = _samples(30)
    picks = sample_shots(train, 4, seed=1)
    assert picks == sample_shots(train, 4, seed=1)
    assert picks == sample_shots(list(reversed(train)), 4, seed=1)  # input order does not matter
    assert len(picks) == 4 and set(picks) <= set(train)
    assert picks == sorted(picks, key=lambda s: s.path)
    assert len({tuple(sample_shots(train, 4, seed)) for seed in range(5)}) > 1
    assert set(sample_shots(train, 2, seed=1)) <= set(sample_shots(train, 8, seed=1))  # nested in k


def test_sample_shots_edges():
    train = _samples(5)
    assert sample_shots(train, 0, seed=0) == [] and sample_shots(train, -1, seed=0) == []
    assert sample_shots(list(reversed(train)), 5, seed=3) == train
    assert sample_shots(train, 50, seed=3) == train


def test_shot_plan_skips_repeats_that_cannot_differ():
    assert shot_plan(5, [0, 1, 4, 5, 8], seeds=3) == [
        (0, 0),
        (1, 0),
        (1, 1),
        (1, 2),
        (4, 0),
        (4, 1),
        (4, 2),
        (5, 0),
    ]
    assert shot_plan(10, [2, 2], seeds=[7, 9]) == [(2, 7), (2, 9)]
    with pytest.raises(ValueError, match="at least one seed"):
        shot_plan(10, [1], seeds=0)


# ---- the real BSData ball-screw set ---------------------------------------------------------


def test_bsdata_ball_screw():
    if not BALL_SCREW.is_dir():
        pytest.skip(f"{BALL_SCREW} is not present")
    data = load_dataset(BALL_SCREW)
    assert data.kind == "mvtec" and len(data.train) == 426
    good = [s for s in data.test if s.label == 0]
    pitting = [s for s in data.test if s.label == 1]
    assert len(good) == 284 and len(pitting) == 325
    assert {s.defect_type for s in pitting} == {"pitting"}
    assert all(len(s.mask_paths) == 1 and s.mask_paths[0].is_file() for s in pitting)
    assert all(s.mask_paths[0].name == f"{s.path.stem}_mask.png" for s in pitting)
