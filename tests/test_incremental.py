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
from defectlens.errors import OutputExistsError, UsageError  # noqa: E402


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



@pytest.mark.usefixtures("one_thread")
def test_predict_csv_names_the_routed_product_before_and_after_an_update(three_products, tmp_path):
    import csv

    from defectlens.cli import main

    first = tmp_path / "first"
    first.mkdir()
    for name in ("washer", "fabric"):
        (first / name).symlink_to(three_products / name)
    model, updated = tmp_path / "m.safetensors", tmp_path / "m2.safetensors"
    assert main(["fit", str(first), "-o", str(model), "--method", "unified", "--size", "64",
                 "--param", "bank_size=64"]) == 0
    assert main(["fit", str(three_products / "gear"), "--update", str(model), "-o", str(updated)]) == 0
    # training images: at routing distance 0 from their own product, so known for certain (held-out
    # ones can be called unknown with 5 images per product, which is the router's job, not this test's)
    washer = sorted((three_products / "washer" / "train" / "good").iterdir())[:2]
    gear = sorted((three_products / "gear" / "train" / "good").iterdir())[:2]

    def products(path, out):
        assert main(["predict", str(path), *map(str, washer + gear), "--csv", str(out)]) == 0
        with open(out, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0])[-1] == "product"  # the CSV contract: new columns at the end
        return [row["product"] for row in rows]

    assert products(model, tmp_path / "before.csv") == ["washer", "washer", "unknown", "unknown"]
    assert products(updated, tmp_path / "after.csv") == ["washer", "washer", "gear", "gear"]


# -- the HTML report of --incremental -------------------------------------------------------------
def _hand_result():
    from defectlens.engine.incremental import IncrementalResult

    image = [[0.90, 0.60, NAN, NAN], [0.80, 0.65, 0.70, NAN], [0.75, 0.70, 0.95, 0.55]]
    pixel = [[0.95, 0.85, NAN, NAN], [0.95, 0.80, 0.90, NAN], [0.94, 0.80, 0.91, 0.66]]
    methods = {name: {"image": image, "pixel": pixel, "step_seconds": [1.0, 2.0, 3.0],
                      "acc_image": average_accuracy(image), "fm_image": forgetting_measure(image),
                      "acc_pixel": average_accuracy(pixel), "fm_pixel": forgetting_measure(pixel)}
               for name in ("unified", "iuf")}
    return IncrementalResult("2-1x2", [["a", "b"], ["c"], ["d"]], {"objects": ["a", "b", "c", "d"]}, methods, {})


def test_the_plot_draws_each_objects_auroc_from_its_learning_step_on():
    from defectlens.report.incremental import auroc_figure

    matrix = np.array([[0.90, 0.60, NAN], [0.80, 0.65, 0.70], [0.75, 0.70, 0.95]])
    lines = auroc_figure(matrix, ["a", "b", "c"], "t").axes[0].get_lines()
    drawn = {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in lines}
    np.testing.assert_allclose(drawn["a"][1], [90, 80, 75])
    np.testing.assert_allclose(drawn["b"][0], [1, 2, 3])
    np.testing.assert_allclose(drawn["c"][0], [2, 3])  # learned at step 2
    np.testing.assert_allclose(drawn["c"][1], [70, 95])


def test_the_incremental_report_embeds_the_plot_of_each_method_and_level(tmp_path):
    import base64
    import re

    import cv2

    from defectlens.report.incremental import _png, auroc_figure, write_incremental_report

    result = _hand_result()
    html = write_incremental_report(tmp_path / "r.html", result).read_text()
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == 4  # 2 methods × image, pixel
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(pngs[0]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and min(decoded.shape[:2]) > 100
    # the first plot is exactly the one drawn from the unified image matrix, not from another matrix
    assert pngs[0] == _png(auroc_figure(np.array(result.methods["unified"]["image"], float), list("abcd"),
                                         "unified: image AUROC per object"))
    assert pngs[1] != pngs[0]
    # the per-step tables and the ACC/FM summary (points) are there
    assert ">95.0<" in html and ">70.0<" in html
    assert f">{100 * result.methods['iuf']['fm_image']:.1f}<" in html
    with pytest.raises(OutputExistsError, match="already exists"):
        write_incremental_report(tmp_path / "r.html", result, overwrite=False)


def test_benchmark_incremental_writes_the_report(tmp_path, monkeypatch):
    import defectlens.engine.incremental as incremental
    from defectlens.cli import main

    monkeypatch.setattr(incremental, "load_objects", lambda *args, **kwargs: [])
    monkeypatch.setattr(incremental, "run_incremental", lambda *args, **kwargs: _hand_result())
    report = tmp_path / "inc.html"
    assert main(["benchmark", str(tmp_path), "--incremental", "2-1x2", "--size", "64", "--report", str(report)]) == 0
    assert report.read_text().count("data:image/png;base64,") == 4
    assert main(["benchmark", str(tmp_path), "--incremental", "2-1x2", "--size", "64", "--report", str(report)]) == 2
