import importlib.util
from collections import Counter

import pytest

from defectlens.data.elpv import CERTAIN_DEFECT, load_elpv


def _write_labels(folder, lines):
    path = folder / "labels.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _fake_lines():
    lines = [f"images/cell{i:04d}.png  0.0  mono" for i in range(10)]
    lines += ["images/cell0100.png  1.0  mono", "images/cell0101.png  1.0  mono",
              "images/cell0102.png  0.3333333333333333  mono", "images/cell0103.png  0.6666666666666666  mono"]
    lines += [f"images/cell{i:04d}.png  0.0  poly" for i in range(200, 205)] + ["images/cell0300.png  1.0  poly"]
    return lines


def test_split_rule_on_a_fake_set(tmp_path):
    dataset = load_elpv("mono", _write_labels(tmp_path, _fake_lines()))
    train = {s.path.name for s in dataset.train}
    test_good = {s.path.name for s in dataset.test if s.label == 0}
    assert len(train) == 6 and len(test_good) == 4  # 60 % of the 10 normal mono cells train
    assert train | test_good == {f"cell{i:04d}.png" for i in range(10)} and not train & test_good
    assert Counter(s.defect_type for s in dataset.test if s.label == 1) == {
        CERTAIN_DEFECT: 2, "defect_p0.67": 1, "defect_p0.33": 1}
    assert all(s.mask_paths == () for s in dataset.test)
    assert dataset.category == "mono" and dataset.train[0].path.parent == tmp_path / "images"


def test_split_is_fixed_by_the_seed_not_the_file_order(tmp_path):
    lines = _fake_lines()
    first = load_elpv("mono", _write_labels(tmp_path, lines))
    (tmp_path / "shuffled").mkdir()
    again = load_elpv("mono", _write_labels(tmp_path / "shuffled", lines[::-1]))
    assert [s.path.name for s in first.train] == [s.path.name for s in again.train]
    other_seed = load_elpv("mono", tmp_path / "labels.csv", seed=1)
    assert {s.path.name for s in other_seed.train} != {s.path.name for s in first.train}


def test_uncertain_cells_can_be_left_out(tmp_path):
    dataset = load_elpv("poly", _write_labels(tmp_path, _fake_lines()), uncertain=False)
    assert [s.defect_type for s in dataset.test if s.label == 1] == [CERTAIN_DEFECT]
    assert len(dataset.train) == 3 and sum(s.label == 0 for s in dataset.test) == 2


def test_bad_line_names_the_file_and_line(tmp_path):
    path = _write_labels(tmp_path, _fake_lines()[:3] + ["images/x.png  0.5  mono"])
    with pytest.raises(ValueError, match=r"labels.csv, line 4: defect probability 0.5"):
        load_elpv("mono", path)
    with pytest.raises(ValueError, match="category 'cigs'"):
        load_elpv("cigs", path)


@pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset not installed")
def test_installed_package_gives_the_documented_split():
    mono = load_elpv("mono")
    assert len(mono.train) == 353  # round(0.6 * 588 defect-free mono cells)
    assert Counter(s.defect_type for s in mono.test) == {
        "good": 235, CERTAIN_DEFECT: 313, "defect_p0.67": 56, "defect_p0.33": 117}
    assert all(s.path.is_file() for s in mono.train[:5] + mono.test[:5])
