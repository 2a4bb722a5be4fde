"""A batch never loses work: each case here was observed on a real run, checked through the CLI."""

import csv
import json
import math
import os
import threading

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from defectlens.cli import main
from defectlens.data import io as image_io
from defectlens.engine import predict as predict_module
from defectlens.engine.outputs import output_stem
from defectlens.models import ModelFileError, create_detector
from defectlens.models.base import Detector
from defectlens.models.modelfile import validate_model_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory, normal_images):
    folder = tmp_path_factory.mktemp("good")
    for i, image in enumerate(normal_images[:3]):
        Image.fromarray(image).save(folder / f"good_{i}.png")
    path = tmp_path_factory.mktemp("model") / "m.dlmodel"
    assert main(["fit", str(folder), "-o", str(path), "--size", "64"]) == 0
    return path


@pytest.fixture()
def images(tmp_path, normal_images, defect_image):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate([*normal_images[3:6], defect_image]):
        Image.fromarray(image).save(folder / f"img_{i}.png")
    return folder


@pytest.fixture()
def count_reads(monkeypatch):
    """How many images the run decoded: zero means nothing was scored."""
    calls = []
    real = predict_module.read_image

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(predict_module, "read_image", counting)
    return calls


def rows_of(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def predict(model, *args):
    return main(["predict", str(model), *map(str, args)])


@pytest.fixture(params=[1, 2], ids=["one chunk at a time", "two chunks in flight"])
def chunks_in_flight(request, monkeypatch):
    """The batch loop as on one core (chunks one at a time) and on two (a chunk scored in a
    thread of its own while the next one's forward runs); torch keeps one thread either way."""
    monkeypatch.setattr(predict_module, "configure_threads", lambda: request.param)
    return request.param


# -- every target checked before scoring ---------------------------------------------------------
def test_every_output_target_is_checked_before_any_image_is_scored(model, images, tmp_path, count_reads, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    report = tmp_path / "old.html"
    report.write_text("keep me")
    cases = [
        ["--csv", blocker / "out.csv"],  # parent is a file
        ["--csv", tmp_path / "out.csv", "--maps", blocker],  # maps "folder" is a file
        ["--csv", tmp_path / "out.csv", "--overlays", blocker / "sub"],
        ["--csv", tmp_path / "out.csv", "--report", report],  # report exists, no --overwrite
        ["--csv", images / "img_0.png"],  # would overwrite an input
    ]
    for extra in cases:
        assert predict(model, images, *extra) == 2, extra
        assert "error:" in capsys.readouterr().err
    assert count_reads == [] and not (tmp_path / "out.csv").exists()
    assert report.read_text() == "keep me" and blocker.read_text() == "not a folder"
    # The model file of fit: refused before fitting.
    assert main(["fit", str(images), "-o", str(blocker / "m.dlmodel")]) == 2
    assert "a_file" in capsys.readouterr().err


def test_an_existing_map_stops_the_run_before_scoring_and_overwrite_replaces_it(model, images, tmp_path, count_reads):
    maps = tmp_path / "maps"
    maps.mkdir()
    taken = maps / f"{output_stem(images / 'img_2.png')}.npy"
    np.save(taken, np.zeros(3))
    out = tmp_path / "out.csv"
    assert predict(model, images, "--csv", out, "--maps", maps) == 2
    assert count_reads == [] and not out.exists() and np.load(taken).shape == (3,)
    assert predict(model, images, "--csv", out, "--maps", maps, "--overwrite") == 0
    assert np.load(taken).shape == (128, 128)


# -- rows flushed as each image finishes; resume and overwrite after a crash -----------------------
def test_rows_survive_an_interruption_and_resume_scores_only_the_rest(model, images, tmp_path, monkeypatch, capsys):
    out, maps = tmp_path / "out.csv", tmp_path / "maps"
    monkeypatch.setattr(Detector, "predict_chunk", 1)
    real, seen = predict_module.read_image, []

    def interrupted_at_third(path, *args, **kwargs):
        seen.append(path)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(predict_module, "read_image", interrupted_at_third)
    assert predict(model, images, "--csv", out, "--maps", maps) == 130
    assert "--resume" in capsys.readouterr().err
    done = rows_of(out)
    assert [os.path.basename(r["path"]) for r in done] == ["img_0.png", "img_1.png"]
    assert all(float(r["score"]) > 0 and os.path.isfile(r["map"]) for r in done)

    # A crash while writing leaves half a row: resume must not keep its truncated score.
    with open(out, "a", encoding="utf-8") as handle:
        handle.write(f"{images / 'img_2.png'},0.1")
    monkeypatch.setattr(predict_module, "read_image", real)
    assert predict(model, images, "--csv", out, "--maps", maps) == 2  # the tool's own CSV is not replaced unasked
    seen.clear()
    monkeypatch.setattr(predict_module, "read_image", lambda path, *a, **k: seen.append(path) or real(path, *a, **k))
    assert predict(model, images, "--csv", out, "--maps", maps, "--resume", "--report", tmp_path / "r.html") == 0
    assert [p.name for p in seen] == ["img_1.png", "img_2.png", "img_3.png"]  # img_1: the same model? (checked)
    assert "4 inputs, 0 failed" in (tmp_path / "r.html").read_text()  # the report covers the earlier rows too
    rows = rows_of(out)
    assert [os.path.basename(r["path"]) for r in rows] == ["img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    assert rows[:2] == done and rows[2]["score"] != "0.1"
    assert "4 images (2 from the earlier run)" in capsys.readouterr().err
    # Or start again from scratch over the partial output.
    assert predict(model, images, "--csv", out, "--maps", maps, "--overwrite") == 0
    assert len(rows_of(out)) == 4


def test_resume_refuses_a_csv_another_model_wrote(model, images, tmp_path, normal_images, capsys):
    out = tmp_path / "out.csv"
    assert predict(model, images, "--csv", out) == 0
    kept = rows_of(out)[:2]
    with open(out, "w", newline="", encoding="utf-8") as handle:  # as if interrupted after two rows
        writer = csv.DictWriter(handle, fieldnames=list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)
    other = tmp_path / "other.dlmodel"
    create_detector("patchcore", size=64).fit(normal_images[3:6]).save(other)
    capsys.readouterr()
    assert predict(other, images, "--csv", out, "--resume") == 2
    assert "written by another model" in capsys.readouterr().err
    assert rows_of(out) == kept
    assert predict(model, images, "--csv", out, "--resume") == 0 and len(rows_of(out)) == 4


def test_an_internal_error_keeps_the_finished_rows_and_says_it_is_a_bug(model, images, tmp_path, monkeypatch, capsys,
                                                                      chunks_in_flight):
    out = tmp_path / "out.csv"
    monkeypatch.setattr(Detector, "predict_chunk", 1)
    real, calls = type(Detector.load(model)).start_predict, []

    def failing_second(self, batch, **options):  # the batch loop's entry: the first chunk is still scoring
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("boom")
        return real(self, batch, **options)

    monkeypatch.setattr(type(Detector.load(model)), "start_predict", failing_second)
    assert predict(model, images, "--csv", out) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "--debug" in err and "Traceback" not in err
    assert len(rows_of(out)) == 1
    calls.clear()
    assert main(["--debug", "predict", str(model), str(images), "--csv", str(out), "--overwrite"]) == 3
    assert "Traceback" in capsys.readouterr().err
    calls.clear()
    assert main(["predict", str(model), str(images), "--csv", str(out), "--overwrite", "--debug"]) == 3


def test_an_error_while_scoring_keeps_the_rows_scored_before_it(model, images, tmp_path, monkeypatch, capsys,
                                                                 chunks_in_flight):
    out = tmp_path / "out.csv"
    monkeypatch.setattr(Detector, "predict_chunk", 1)
    detector_type = type(Detector.load(model))
    real, calls = detector_type.staged_prediction, []

    def second_fails_when_scored(self, batch, maps):
        finish = real(self, batch, maps)
        calls.append(1)
        if len(calls) == 2:
            def failing():
                raise TypeError("boom")
            return failing
        return finish

    monkeypatch.setattr(detector_type, "staged_prediction", second_fails_when_scored)
    assert predict(model, images, "--csv", out) == 3
    assert "internal error" in capsys.readouterr().err
    assert [os.path.basename(row["path"]) for row in rows_of(out)] == ["img_0.png"]


def test_two_chunks_in_flight_write_what_one_chunk_at_a_time_writes(model, images, tmp_path, monkeypatch):
    monkeypatch.setattr(Detector, "predict_chunk", 1)
    detector_type = type(Detector.load(model))
    real, scored_in = detector_type.staged_prediction, []

    def recording(self, batch, maps):
        finish = real(self, batch, maps)

        def finished():
            scored_in.append(threading.current_thread().name)
            return finish()
        return finished

    monkeypatch.setattr(detector_type, "staged_prediction", recording)
    written = {}
    for cores in (1, 2):
        monkeypatch.setattr(predict_module, "configure_threads", lambda: cores)
        scored_in.clear()
        out, maps = tmp_path / f"{cores}.csv", tmp_path / f"maps{cores}"
        assert predict(model, images, "--csv", out, "--maps", maps) == 0
        rows = rows_of(out)
        written[cores] = ([(row["path"], row["score"], row["label"]) for row in rows],
                          [np.load(row["map"]) for row in rows])
        # where the scoring ran: here one at a time, in the scoring thread with two in flight
        assert len(scored_in) == 4 and all(name.startswith("defectlens-score") == (cores == 2) for name in scored_in)
    assert written[1][0] == written[2][0]
    assert all(np.array_equal(a, b) for a, b in zip(written[1][1], written[2][1]))


# -- names: not UTF-8, and never confused -------------------------------------------------------------
@pytest.mark.skipif(os.name == "nt", reason="file names are bytes only on POSIX")
def test_a_file_name_that_is_not_utf8_gets_its_row_and_the_csv_stays_whole(model, images, tmp_path, capsys):
    odd = os.fsdecode(bytes(images) + b"/caf\xe9.png")  # Latin-1 "café": not valid UTF-8
    Image.open(images / "img_0.png").save(odd, format="PNG")
    out = tmp_path / "out.csv"
    report = tmp_path / "r.html"
    assert predict(model, images, "--csv", out, "--maps", tmp_path / "maps", "--report", report) == 0
    assert "5 inputs, 0 failed" in report.read_text(encoding="utf-8")
    rows = rows_of(out)  # strict UTF-8 read: would fail on raw bytes
    names = sorted(os.path.basename(r["path"]) for r in rows)
    assert names == ["caf\\xe9.png", "img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    odd_row = next(r for r in rows if "caf" in r["path"])
    assert float(odd_row["score"]) == pytest.approx(float(next(r for r in rows if r["path"].endswith("img_0.png"))["score"]))
    # Without --csv the rows go to stdout, which must not fail either.
    assert predict(model, images / "img_1.png", odd) == 0
    assert "caf\\xe9.png" in capsys.readouterr().out


def test_same_named_inputs_get_distinct_maps_listed_in_the_csv(model, tmp_path, normal_images, defect_image):
    for sub, image in (("a", normal_images[3]), ("b", defect_image)):
        (tmp_path / sub).mkdir()
        Image.fromarray(image).save(tmp_path / sub / "001.png")
    out, maps, overlays = tmp_path / "out.csv", tmp_path / "maps", tmp_path / "overlays"
    assert predict(model, tmp_path / "a", tmp_path / "b", "--csv", out, "--maps", maps, "--overlays", overlays) == 0
    rows = {r["path"].split(os.sep)[-2]: r for r in rows_of(out)}
    assert rows["a"]["map"] != rows["b"]["map"] and len(os.listdir(maps)) == 2
    assert os.path.basename(rows["a"]["map"]).startswith("001-") and rows["a"]["overlay"].endswith(".png")
    # The map in each row is that image's own: the defect image's map is the hot one, hottest at the defect.
    defect_map, normal_map = np.load(rows["b"]["map"]), np.load(rows["a"]["map"])
    assert defect_map.shape == (128, 128) and defect_map[80:100, 30:50].mean() > defect_map.mean()
    assert defect_map[80:100, 30:50].mean() > normal_map[80:100, 30:50].mean()
    assert Image.open(rows["b"]["overlay"]).size == (128, 128)


# -- huge images --------------------------------------------------------------------------------------
def test_images_above_the_pixel_limit_get_a_row_and_large_ones_are_scored_reduced(model, images, tmp_path, monkeypatch):
    out = tmp_path / "out.csv"
    # 128×128 = 0.016 Mpx: above a 0.01 Mpx limit.
    assert predict(model, images / "img_0.png", "--csv", out, "--max-megapixels", "0.01") == 1
    (row,) = rows_of(out)
    assert row["score"] == "" and "128×128" in row["error"] and "Mpx" in row["error"]

    monkeypatch.setattr(image_io, "MAX_SCORING_SIDE", 64)
    assert predict(model, images / "img_3.png", "--csv", out, "--maps", tmp_path / "maps", "--overwrite") == 0
    (row,) = rows_of(out)
    assert np.load(row["map"]).shape == (64, 64)  # written at the reduced decoding size


# -- every input accounted for ----------------------------------------------------------------------
def test_every_input_is_accounted_for(model, images, tmp_path, capsys):
    (images / "gone.png").symlink_to(tmp_path / "deleted.png")
    (images / "notes.txt").write_text("a note")
    (images / ".thumb.png").write_bytes(b"")
    os.mkfifo(images / "pipe.png")
    out = tmp_path / "out.csv"
    assert predict(model, images, tmp_path / "missing.png", "--csv", out) == 1
    rows = {os.path.basename(r["path"]): r for r in rows_of(out)}
    assert set(rows) == {"img_0.png", "img_1.png", "img_2.png", "img_3.png", "gone.png", "pipe.png", "missing.png"}
    assert "broken symbolic link" in rows["gone.png"]["error"]
    assert "not a regular file" in rows["pipe.png"]["error"]
    assert "does not exist" in rows["missing.png"]["error"]
    err = capsys.readouterr().err
    assert "skipped 2 items" in err and "1 hidden" in err and "without an image suffix" in err


# -- thresholds and model files ---------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc"])
def test_a_threshold_that_is_not_a_finite_number_is_refused(model, images, value, capsys):
    with pytest.raises(SystemExit) as stop:
        predict(model, images, f"--threshold={value}")
    assert stop.value.code == 2 and f"{value!r} is not a" in capsys.readouterr().err


def _rewrite_config(source, target, **changes):
    with safe_open(str(source), framework="pt") as handle:
        config = json.loads(handle.metadata()["defectlens"])
    config.update(changes)
    save_file(load_file(str(source)), str(target), metadata={"defectlens": json.dumps(config)})
    return config


BAD_FIELDS = [
    ("threshold", math.nan), ("threshold", "0.5"), ("threshold", math.inf), ("map_range", [0.0]),
    ("map_range", [1.0, math.nan]), ("map_range", [2.0, 1.0]), ("params", []), ("method", 7), ("extra", "x"),
    ("format_version", "1"), ("format_version", True), ("format", "other"), ("operating_fpr", 1.5),
    ("operating_fpr", "0.01"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_a_model_file_with_a_wrong_field_is_one_clear_line(model, images, tmp_path, capsys, field, value):
    bad = tmp_path / "bad.dlmodel"
    config = _rewrite_config(model, bad, **{field: value})
    with pytest.raises(ModelFileError, match=field):
        validate_model_config(config, bad)
    assert predict(bad, images) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.dlmodel" in err[0] and field in err[0] and "Traceback" not in err[0]
    assert main(["info", str(bad)]) == 2  # `info` reads the file through the same checks
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.dlmodel" in err[0] and field in err[0]


@pytest.mark.parametrize("changes,named", [({"method": "nosuch"}, "unknown method 'nosuch'"),
                                           ({"params": {"size": 5}}, "size"), ({"params": {"nosuch": 1}}, "nosuch")])
def test_info_refuses_the_method_and_parameters_load_refuses(model, images, tmp_path, capsys, changes, named):
    bad = tmp_path / "bad.dlmodel"
    with safe_open(str(model), framework="pt") as handle:
        params = json.loads(handle.metadata()["defectlens"])["params"]
    _rewrite_config(model, bad, **{key: {**params, **value} if key == "params" else value for key, value in changes.items()})
    for command in (["predict", str(bad), str(images)], ["info", str(bad)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "bad.dlmodel" in err[0] and named in err[0]


def test_a_valid_model_config_passes_and_a_newer_version_is_named(model, tmp_path):
    with safe_open(str(model), framework="pt") as handle:
        config = json.loads(handle.metadata()["defectlens"])
    validate_model_config(config, model)
    validate_model_config({**config, "threshold": None, "map_range": None}, model)
    with pytest.raises(ModelFileError, match="newer"):
        validate_model_config({**config, "format_version": 99}, model)


def test_exit_status_is_zero_only_when_every_input_was_scored(model, images, tmp_path):
    assert predict(model, images, "--csv", tmp_path / "a.csv") == 0
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    assert predict(model, images, "--csv", tmp_path / "b.csv") == 1
    assert len(rows_of(tmp_path / "b.csv")) == 5


# -- scores only, decoding ahead --------------------------------------------------------------------
def test_a_csv_run_skips_the_maps_but_not_a_score_and_a_bad_file_keeps_its_place(model, images, tmp_path, monkeypatch):
    monkeypatch.setattr(Detector, "predict_chunk", 2)  # batches [img_0, bad], [img_1, img_2], [img_3]
    (images / "img_0b.png").write_bytes(b"not a png")
    plain, mapped = tmp_path / "plain.csv", tmp_path / "mapped.csv"
    assert predict(model, images, "--csv", plain) == 1
    assert predict(model, images, "--csv", mapped, "--maps", tmp_path / "maps") == 1
    rows, rows_with_maps = rows_of(plain), rows_of(mapped)
    assert [os.path.basename(r["path"]) for r in rows] == ["img_0.png", "img_0b.png", "img_1.png", "img_2.png", "img_3.png"]
    assert [r["path"] for r in rows_with_maps] == [r["path"] for r in rows]
    assert rows[1]["score"] == "" and "img_0b.png" in rows[1]["error"]
    for row, row_with_maps in zip(rows, rows_with_maps):
        assert row["label"] == row_with_maps["label"] and row["map"] == ""
        if not row["error"]:
            assert float(row["score"]) == pytest.approx(float(row_with_maps["score"]), rel=1e-5)
            assert row_with_maps["map"]


def test_decoding_ahead_keeps_the_input_order_and_each_files_error(tmp_path, normal_images):
    paths = []
    for i in range(11):
        path = tmp_path / f"{i:02d}.png"
        if i % 4 == 1:
            path.write_bytes(b"broken")
        else:
            Image.fromarray(normal_images[i % 6]).save(path)
        paths.append(path)
    got = list(predict_module.decoded_ahead(paths, None, ahead=3))
    assert [path for path, _ in got] == paths
    for i, (path, image) in enumerate(got):
        if i % 4 == 1:
            assert isinstance(image, image_io.ImageReadError) and str(path) in str(image)
        else:
            assert np.array_equal(image, normal_images[i % 6])
