import csv
import gc
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlens.cli import main


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, normal_images):
    folder = tmp_path_factory.mktemp("good")
    for i, image in enumerate(normal_images[:4]):
        Image.fromarray(image).save(folder / f"good_{i}.png")
    path = tmp_path_factory.mktemp("models") / "model.dlmodel"
    assert main(["fit", str(folder), "-o", str(path), "--size", "128"]) == 0
    return path


@pytest.fixture()
def mixed_inputs(tmp_path, normal_images, defect_image):
    """Every kind of input a line PC throws at us, good and bad."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(defect_image).save(folder / "rgb.png")
    Image.fromarray(normal_images[5][..., 0]).save(folder / "gray.png")
    Image.fromarray(normal_images[5][..., 0].astype(np.uint16) * 257).save(folder / "deep16.png")
    rgba = np.dstack([normal_images[5], np.full(normal_images[5].shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    (folder / "empty.png").write_bytes(b"")
    whole = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.jpg").write_text("not an image")
    return folder


def read_rows(path):
    with open(path, newline="") as handle:
        return {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(handle)}


def test_predict_survives_bad_files_and_writes_maps_at_image_size(model_path, mixed_inputs, tmp_path, capsys):
    out_csv, maps = tmp_path / "out.csv", tmp_path / "maps"
    status = main(["predict", str(model_path), str(mixed_inputs), "--csv", str(out_csv), "--maps", str(maps)])
    assert status == 1, "a failed input must give a non-zero exit status"
    rows = read_rows(out_csv)
    assert set(rows) == {"rgb.png", "gray.png", "deep16.png", "alpha.png", "empty.png", "truncated.png", "notes.jpg"}
    for bad in ("empty.png", "truncated.png", "notes.jpg"):
        assert rows[bad]["score"] == "" and bad in rows[bad]["error"]
    for good in ("rgb.png", "gray.png", "deep16.png", "alpha.png"):
        assert float(rows[good]["score"]) >= 0 and rows[good]["label"] in ("normal", "anomalous")
        assert np.load(rows[good]["map"]).shape == (128, 128)
        assert Path(rows[good]["map"]).parent == maps
    assert rows["rgb.png"]["label"] == "anomalous"
    assert float(rows["rgb.png"]["score"]) > max(float(rows[g]["score"]) for g in ("gray.png", "deep16.png", "alpha.png"))
    assert "empty" in capsys.readouterr().err


def test_predict_refuses_to_overwrite_and_overlays_are_images(model_path, mixed_inputs, tmp_path):
    out_csv = tmp_path / "out.csv"
    out_csv.write_text("precious")
    assert main(["predict", str(model_path), str(mixed_inputs / "rgb.png"), "--csv", str(out_csv)]) == 2
    assert out_csv.read_text() == "precious"
    overlays = tmp_path / "overlays"
    assert main(["predict", str(model_path), str(mixed_inputs / "rgb.png"), "--csv", str(out_csv), "--overwrite",
                 "--overlays", str(overlays)]) == 0
    assert Image.open(read_rows(out_csv)["rgb.png"]["overlay"]).size == (128, 128)


def test_fit_refuses_to_overwrite_a_model(model_path, tmp_path):
    before = model_path.read_bytes()
    assert main(["fit", str(tmp_path), "-o", str(model_path)]) == 2
    assert model_path.read_bytes() == before


def test_overwrite_never_replaces_input_data_or_a_device(normal_images, tmp_path, capsys):
    """--overwrite replaces an earlier output, not a training image, a pipe or a device (all
    refused before any work), and --json and --report cannot be one file."""
    import os

    good = tmp_path / "good"
    good.mkdir()
    image = good / "good_0.png"
    Image.fromarray(normal_images[0]).save(image)
    before = image.read_bytes()
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    capsys.readouterr()
    assert main(["fit", str(good), "-o", str(image), "--overwrite", "--size", "128"]) == 2
    assert "is a file of the input data" in capsys.readouterr().err
    assert image.read_bytes() == before
    assert main(["fit", str(good), "-o", str(pipe), "--overwrite", "--size", "128"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert main(["benchmark", str(good), "--json", str(image), "--overwrite"]) == 2
    assert image.read_bytes() == before
    same = tmp_path / "out.json"
    assert main(["benchmark", str(good), "--json", str(same), "--report", str(same)]) == 2
    assert "name the same file" in capsys.readouterr().err and not same.exists()


def test_a_reader_that_stops_reading_is_not_reported_as_a_bug(model_path):
    """`defectlens info MODEL | head -1`: the pipe's reader is gone before the output is written."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "defectlens.cli", "info", str(model_path)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_main_leaves_the_garbage_collector_as_it_found_it(tmp_path, mixed_inputs):
    """main() turns the collector off while it imports and freezes what exists for the command's
    run; a program that calls it (a test, a notebook) must get both back, after an error or an
    exit from argparse too."""
    frozen = gc.get_freeze_count()
    bad = tmp_path / "bad.dlmodel"
    bad.write_bytes(b"\x00" * 64)
    assert main(["predict", str(bad), str(mixed_inputs / "rgb.png")]) == 2
    with pytest.raises(SystemExit):
        main(["--no-such-option"])
    # (a frozen object that loses its last reference is still freed: the count can only drop)
    assert gc.isenabled() and gc.get_freeze_count() <= frozen
    gc.disable()  # a caller that had it off keeps it off
    try:
        assert main(["predict", str(bad), str(mixed_inputs / "rgb.png")]) == 2
        assert not gc.isenabled()
    finally:
        gc.enable()
    gc.freeze()  # and one that froze its own objects keeps them frozen, no more
    try:
        own = gc.get_freeze_count()
        assert main(["predict", str(bad), str(mixed_inputs / "rgb.png")]) == 2
        assert own // 2 < gc.get_freeze_count() <= own
    finally:
        gc.unfreeze()


def test_predict_with_a_corrupt_model_file_is_a_clear_error(tmp_path, mixed_inputs, capsys):
    bad = tmp_path / "bad.dlmodel"
    bad.write_bytes(b"\x00" * 64)
    assert main(["predict", str(bad), str(mixed_inputs / "rgb.png")]) == 2
    assert "bad.dlmodel" in capsys.readouterr().err


def test_info_shows_the_threshold_and_the_operating_points_predict_would_set(model_path, tmp_path, capsys):
    """`info` reads a model file without fitting anything: the threshold stored, and for each
    listed false-alarm rate the threshold `--target-fpr` would set from the same held-out scores."""
    from defectlens.models import Detector

    assert main(["info", str(model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    detector = Detector.load(model_path)
    assert info["method"] == detector.name == "patchknn" and info["params"] == detector.get_params()
    assert info["threshold"] == detector.threshold
    assert info["normal_scores"]["count"] == len(detector.normal_scores) == 4
    # the stored threshold is the listed one at the rate it was set for (from the same scores, stored as float32)
    stored = [point["threshold"] for point in info["operating_points"] if point["fpr"] == info["operating_fpr"]]
    assert stored == [pytest.approx(info["threshold"], rel=1e-6)]
    for point in info["operating_points"]:
        assert point["threshold"] == pytest.approx(detector.set_operating_point(point["fpr"]), rel=1e-12)
    assert info["tensors"]["bank"]["shape"][1] == 152 and info["products"] is None
    assert main(["info", str(model_path)]) == 0
    text = capsys.readouterr().out
    assert f"threshold {info['threshold']:.4g}: flags about 1 % of good parts" in text
    assert "patchknn with size=128, geometry=tiles (other parameters at the method's defaults)" in text
    bad = tmp_path / "notes.dlmodel"
    bad.write_text("not a model")
    assert main(["info", str(bad)]) == 2
    assert "notes.dlmodel: not a defectlens model file" in capsys.readouterr().err


def test_benchmark_writes_json_and_report(synthetic_mvtec, tmp_path):
    out_json, report = tmp_path / "bench.json", tmp_path / "bench.html"
    assert main(["benchmark", str(synthetic_mvtec), "--shots", "1,2,full", "--seeds", "2", "--size", "128",
                 "--json", str(out_json), "--report", str(report)]) == 0
    def no_constants(name):  # NaN / Infinity are not JSON: other readers (JavaScript, jq) refuse them
        raise ValueError(f"{name} in the benchmark JSON")

    result = json.loads(out_json.read_text(), parse_constant=no_constants)
    assert [(r["shots"], r["seed"]) for r in result["runs"]] == [(1, 0), (1, 1), (2, 0), (2, 1), (8, 0)]
    assert [row["shots"] for row in result["summary"]] == [1, 2, 8]
    assert 0.0 <= result["summary"][-1]["image_auroc"][0] <= 1.0
    assert "au_pro" in result["runs"][0]["metrics"]["all"]
    assert report.read_text().count("<img") >= 3


def test_benchmark_options_it_would_ignore_are_errors(tmp_path, capsys):
    """No empty table from `--shots ''`, and --incremental (every method, every image) does not
    silently drop a --method, --shots or --seeds it was given."""
    for shots in ("", ",", " , "):
        assert main(["benchmark", str(tmp_path), "--shots", shots]) == 2
        assert "names no number of shots" in capsys.readouterr().err
    for option in (["--method", "patchcore"], ["--shots", "1"], ["--seeds", "2"]):
        assert main(["benchmark", str(tmp_path), "--incremental", "2-1x2", *option]) == 2
        assert f"drop {option[0]}" in capsys.readouterr().err


def test_more_shots_than_images_says_so(tmp_path, normal_images, capsys):
    for i, image in enumerate(normal_images[:3]):
        Image.fromarray(image).save(tmp_path / f"good_{i}.png")
    assert main(["fit", str(tmp_path), "-o", str(tmp_path / "m" / "m.dlmodel"), "--shots", "10", "--size", "64",
                 "--method", "patchcore"]) == 0
    assert "--shots 10: " in capsys.readouterr().err


def test_our_warnings_reach_the_user_as_one_line(tmp_path, normal_images):
    import subprocess
    import sys

    Image.fromarray(normal_images[0]).save(tmp_path / "good.png")
    done = subprocess.run([sys.executable, "-m", "defectlens.cli", "fit", str(tmp_path), "-o", str(tmp_path / "m.dlmodel"),
                           "--method", "musc"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    warning = [line for line in done.stderr.splitlines() if "zero-shot" in line]
    assert len(warning) == 1 and warning[0].startswith("defectlens: warning: musc is zero-shot")
    assert "model.py" not in done.stderr and "warnings.warn" not in done.stderr


def test_stdout_has_one_line_of_three_fields_per_input_whatever_the_file_names(model_path, tmp_path, normal_images, capsys):
    names = ["plain.png", "tab\there.png", "line\nbreak.png", "cr\rhere.png"]
    for name in names:
        Image.fromarray(normal_images[0]).save(tmp_path / name, format="PNG")
    capsys.readouterr()
    assert main(["predict", str(model_path), str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names) and all(len(line.split("\t")) == 3 for line in lines)
    assert {line.split("\t")[0].rsplit("/", 1)[1] for line in lines} == {"plain.png", "tab\\there.png",
                                                                           "line\\nbreak.png", "cr\\rhere.png"}


def test_a_target_fpr_the_shots_cannot_give_keeps_the_fitted_model(tmp_path, normal_images, capsys):
    for i, image in enumerate(normal_images[:3]):
        Image.fromarray(image).save(tmp_path / f"good_{i}.png")
    model = tmp_path / "m" / "m.dlmodel"
    assert main(["fit", str(tmp_path), "-o", str(model), "--shots", "1", "--target-fpr", "0.05", "--size", "64",
                 "--method", "patchcore"]) == 2
    assert "needs at least 3" in capsys.readouterr().err and model.is_file()


def test_a_folder_given_as_the_model_is_named_as_such(tmp_path, capsys):
    for command in ("info", "predict"):
        assert main([command, str(tmp_path)] + ([str(tmp_path)] if command == "predict" else [])) == 2
        assert "is a folder, not a model file" in capsys.readouterr().err


def test_a_param_given_twice_is_an_error_not_the_last_one(tmp_path, capsys):
    assert main(["fit", str(tmp_path), "-o", str(tmp_path / "m.dlmodel"), "--param", "bank_size=64",
                 "--param", "bank_size=32"]) == 2
    assert "--param bank_size is given twice" in capsys.readouterr().err


def test_param_reaches_the_method_and_bad_params_are_one_line_errors(tmp_path, normal_images, capsys):
    from defectlens.models import Detector, ParameterError, create_detector

    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(normal_images[:3]):
        Image.fromarray(image).save(folder / f"good_{i}.png")
    path = tmp_path / "small.dlmodel"
    assert main(["fit", str(folder), "-o", str(path), "--method", "patchcore", "--param", "size=128", "--param", "bank_size=64",
                 "--param", "reweight_neighbours=0"]) == 0
    model = Detector.load(path)
    assert model.bank_size == 64 and model.reweight_neighbours == 0 and model.size == 128
    assert model.bank.shape[0] == 64
    capsys.readouterr()

    def refused(*extra, expect):
        target = tmp_path / "refused.dlmodel"
        assert main(["fit", str(folder), "-o", str(target), "--method", "patchcore", *extra]) == 2
        error = capsys.readouterr().err
        assert expect in error and "Traceback" not in error and len(error.strip().splitlines()) == 1, error
        assert not target.exists()
        return error

    # The same message as the Python API, naming the typo and what is accepted.
    error = refused("--param", "bank_sise=64", expect="bank_sise")
    with pytest.raises(ParameterError) as api:
        create_detector("patchcore", bank_sise=64)
    assert str(api.value) in error and "bank_size" in error
    refused("--param", "novalue", expect="KEY=VALUE")
    refused("--param", "bank_size=abc", expect="bank_size must be an integer")
    refused("--param", "seed=1", expect="--seed")
    refused("--size", "0", expect="size must be an integer >= 32")
    refused("--size", "100000", expect="size must be an integer >= 32 and <= 2048")
    refused("--size", "128", "--param", "size=64", expect="disagree")


def test_fit_without_method_takes_the_suite_default_says_so_and_lets_params_override(tmp_path, capsys):
    """No --method: patchknn at native resolution in tiles (the suite's winner at 4 shots and
    full-shot); fit names what it took; an explicit --param wins over the default's."""
    from defectlens.models import DEFAULT_METHOD, DEFAULT_PARAMS, MANY_IMAGES, Detector
    from conftest import textured_image

    rng = np.random.default_rng(5)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(textured_image(rng, 96)).save(folder / f"good_{i}.png")
    default, square = tmp_path / "default.dlmodel", tmp_path / "square.dlmodel"
    assert main(["fit", str(folder), "-o", str(default), "--size", "32"]) == 0
    assert f"took {DEFAULT_METHOD} with geometry=tiles (the default below {MANY_IMAGES} good images" in capsys.readouterr().out
    loaded = Detector.load(default)
    assert loaded.name == DEFAULT_METHOD and loaded.geometry == DEFAULT_PARAMS["geometry"] == "tiles"
    assert len(loaded._tiles()) == 4 * 4  # 96 px at 32-px tiles overlapping by a quarter: 4 a side
    assert main(["fit", str(folder), "-o", str(square), "--size", "32", "--param", "geometry=square"]) == 0
    assert f"with geometry=square (the default below {MANY_IMAGES}" in capsys.readouterr().out
    assert Detector.load(square).geometry == "square"


def test_fit_without_method_takes_the_fused_ensemble_from_many_good_images(tmp_path, capsys, monkeypatch):
    """From MANY_IMAGES good images the default is the tiled padim + patchknn ensemble fused by
    the larger z-score; fit says so, and a --param valid for it overrides its value."""
    import defectlens.models as models
    from defectlens.models import MANY_IMAGES_PARAMS, Detector
    from conftest import textured_image

    monkeypatch.setattr(models, "MANY_IMAGES", 5)
    rng = np.random.default_rng(7)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(textured_image(rng, 64)).save(folder / f"good_{i}.png")
    path = tmp_path / "many.dlmodel"
    assert main(["fit", str(folder), "-o", str(path), "--size", "32", "--param", "fusion=mean"]) == 0
    said = capsys.readouterr().out
    assert "took ensemble with geometry=tiles, fusion=mean, members=" in said and "(the default from 5 good images" in said
    loaded = Detector.load(path)
    assert loaded.name == "ensemble" and loaded.fusion == "mean" and loaded.geometry == "tiles"
    assert loaded.member_params == MANY_IMAGES_PARAMS["member_params"]
    assert main(["fit", str(folder), "-o", str(tmp_path / "few.dlmodel"), "--size", "32", "--shots", "4"]) == 0
    assert "took patchknn with geometry=tiles (the default below 5 good images" in capsys.readouterr().out


def test_the_default_squashes_when_the_tiles_would_not_fit_the_feature_budget(tmp_path, capsys, monkeypatch):
    """Hundreds of large images in tiles would exhaust memory: past TILED_FEATURE_BUDGET the
    default takes the square input and says why; an explicit geometry is kept whatever it costs."""
    from defectlens.engine import fit as fit_module
    from defectlens.models import MANY_IMAGES, Detector
    from conftest import textured_image

    rng = np.random.default_rng(6)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(textured_image(rng, 96)).save(folder / f"good_{i}.png")
    # 4 images x 16 tiles x (152 channels x 4 x 4 patches x 4 bytes) = 622,592 bytes at 32-px tiles
    monkeypatch.setattr(fit_module, "TILED_FEATURE_BUDGET", 600_000)
    squashed, tiled = tmp_path / "squashed.dlmodel", tmp_path / "tiled.dlmodel"
    assert main(["fit", str(folder), "-o", str(squashed), "--size", "32"]) == 0
    said = capsys.readouterr().out
    assert f"with geometry=square (the default below {MANY_IMAGES} good images, squashed: 4 images in 16 tiles would hold" in said
    assert Detector.load(squashed).geometry == "square"
    assert main(["fit", str(folder), "-o", str(tiled), "--size", "32", "--param", "geometry=tiles"]) == 0
    assert Detector.load(tiled).geometry == "tiles"
    monkeypatch.setattr(fit_module, "TILED_FEATURE_BUDGET", 700_000)
    assert main(["fit", str(folder), "-o", str(tmp_path / "fits.dlmodel"), "--size", "32"]) == 0
    assert f"with geometry=tiles (the default below {MANY_IMAGES} good images: the best mean" in capsys.readouterr().out
