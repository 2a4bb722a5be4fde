"""ACC and FM on hand-computed matrices, and schedule parsing."""

import math

import numpy as np
import pytest

from defectlens.metrics.incremental import average_accuracy, first_steps, forgetting_measure

NAN = float("nan")


def test_acc_and_fm_on_a_hand_computed_10_1x2_style_matrix():
    # 2 objects in step 0, one more in each of steps 1 and 2.
    accuracy = [[0.90, 0.80, NAN, NAN],
                [0.85, 0.82, 0.70, NAN],
                [0.80, 0.78, 0.75, 0.60]]
    # ACC = (0.80 + 0.78 + 0.75 + 0.60) / 4
    assert average_accuracy(accuracy) == pytest.approx(2.93 / 4)
    # FM over objects 0..2: drops 0.90-0.80, 0.82-0.78, 0.70-0.75 (object 3 is new in the last step)
    assert forgetting_measure(accuracy) == pytest.approx((0.10 + 0.04 - 0.05) / 3)
    assert first_steps(accuracy).tolist() == [0, 0, 1, 2]


def test_a_model_that_never_forgets_has_zero_fm_and_a_perfect_one_acc_1():
    accuracy = np.full((4, 5), 1.0)
    accuracy[0, 2:] = NAN
    assert average_accuracy(accuracy) == 1.0
    assert forgetting_measure(accuracy) == 0.0


def test_single_step_has_no_forgetting_and_unlearned_objects_are_refused():
    assert math.isnan(forgetting_measure([[0.9, 0.8]]))
    with pytest.raises(ValueError, match="last step"):
        average_accuracy([[0.9, NAN]])


# -- schedules and the protocol ---------------------------------------------------------------
from defectlens.engine.incremental import parse_schedule, split_steps  # noqa: E402
from defectlens.errors import UsageError  # noqa: E402


def test_schedules_parse_as_the_write_up_names_them():
    assert parse_schedule("10-5") == [10, 5]
    assert parse_schedule("3x5") == [3, 3, 3, 3, 3]
    assert parse_schedule("10-1x5") == [10, 1, 1, 1, 1, 1]
    assert split_steps(list("abcd"), parse_schedule("2-1x2")) == [["a", "b"], ["c"], ["d"]]
    for bad in ("10-", "x5", "3x0", "ten"):
        with pytest.raises(UsageError):
            parse_schedule(bad)
    with pytest.raises(UsageError, match="covers 3 objects but the data has 4"):
        split_steps(list("abcd"), [2, 1])


@pytest.fixture(scope="module")
def three_products(tmp_path_factory):
    from defectlens.data.generator import generate

    out = tmp_path_factory.mktemp("products")
    generate(out, kind="mvtec", seed=1, size=64, n_train=5, n_test_good=2, n_test_defect_per_type=1,
             categories=["washer", "fabric", "gear"])
    return out


@pytest.mark.usefixtures("one_thread")
def test_the_unified_bank_never_forgets_and_the_shared_bank_is_measured(three_products):
    from defectlens.backbones import get_backbone
    from defectlens.engine.incremental import default_params, load_objects, run_incremental

    backbone = get_backbone(size=64)
    objects = load_objects([three_products], backbone, max_test=6)
    params = default_params(64, bank_size=64)
    result = run_incremental(objects, "1x3", backbone, params, methods=("unified", "patchcore-shared"))
    image = np.array(result.methods["unified"]["image"])
    # each object's column is the same at every step after it was learned: nothing is forgotten
    for i in range(3):
        column = image[i:, i]
        np.testing.assert_allclose(column, column[0])
    assert result.methods["unified"]["fm_image"] == 0.0
    assert result.routing["accuracy"] == 1.0
    assert np.isfinite(result.methods["patchcore-shared"]["acc_pixel"])


@pytest.mark.usefixtures("one_thread")
def test_fit_update_adds_products_to_a_copy_and_refuses_other_methods(three_products, tmp_path, capsys):
    from defectlens.cli import main
    from defectlens.models import Detector

    first = tmp_path / "first"
    first.mkdir()
    for name in ("washer", "fabric"):
        (first / name).symlink_to(three_products / name)
    model, updated = tmp_path / "m.safetensors", tmp_path / "m2.safetensors"
    common = ["--size", "64", "--param", "bank_size=64"]
    assert main(["fit", str(first), "-o", str(model), "--method", "unified", *common]) == 0
    assert main(["fit", str(three_products / "gear"), "--update", str(model), "-o", str(updated)]) == 0
    assert Detector.load(model).products == ["fabric", "washer"]
    assert Detector.load(updated).products == ["fabric", "washer", "gear"]
    assert main(["fit", str(three_products / "gear"), "--update", str(model), "-o", str(model)]) == 2  # exists
    plain = tmp_path / "p.safetensors"
    assert main(["fit", str(three_products / "gear"), "-o", str(plain), "--method", "patchcore", *common]) == 0
    capsys.readouterr()
    assert main(["fit", str(three_products / "washer"), "--update", str(plain), "-o", str(tmp_path / "x")]) == 2
    assert "cannot learn new products" in capsys.readouterr().err
