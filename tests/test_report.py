import math

import numpy as np
import pytest

from defectlens.data.io import read_image
from defectlens.report import (
    ImageRecord,
    colorize,
    heatmap_overlay,
    save_png,
    write_report,
)

GREEN = (0, 255, 0)


def _image(height=40, width=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _embedded_images(html: str) -> int:
    return html.count('src="data:image/png;base64,')


# -- overlay -------------------------------------------------------------------------------


def test_overlay_resizes_map_to_image():
    out = heatmap_overlay(_image(), np.random.default_rng(1).random((8, 8)), 0.0, 1.0)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8


def test_overlay_with_alpha_zero_is_the_image():
    image = _image()
    np.testing.assert_array_equal(heatmap_overlay(image, np.ones((40, 60)), 0.0, 1.0, alpha=0.0), image)


def test_overlay_colour_scale_is_fixed_not_per_image():
    # Two maps with the same values relative to their own range but not to vmin/vmax must differ.
    low = heatmap_overlay(_image(), np.full((40, 60), 0.1), 0.0, 1.0, alpha=1.0)
    high = heatmap_overlay(_image(), np.full((40, 60), 0.9), 0.0, 1.0, alpha=1.0)
    assert low[0, 0, 2] > low[0, 0, 0] and high[0, 0, 0] > high[0, 0, 2]  # blue vs red


def test_overlay_saturates_outside_range_and_handles_nan():
    values = np.array([[-5.0, np.nan], [1.0, 7.0]], dtype=np.float32)
    colours = colorize(values, 1.0, 2.0)
    np.testing.assert_array_equal(colours[0, 0], colours[1, 0])
    np.testing.assert_array_equal(colours[0, 1], colours[1, 0])
    assert not np.array_equal(colours[1, 1], colours[1, 0])


def test_overlay_rejects_empty_colour_range():
    with pytest.raises(ValueError, match="vmax"):
        heatmap_overlay(_image(), np.zeros((40, 60)), 1.0, 1.0)


@pytest.mark.parametrize("mask_scale", [1, 2, 0.5])
def test_mask_contour_is_green(mask_scale):
    image = np.full((40, 60, 3), 128, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:20, 16:30] = True
    if mask_scale == 2:
        mask = np.kron(mask, np.ones((2, 2), bool))
    elif mask_scale == 0.5:
        mask = mask[::2, ::2]
    out = heatmap_overlay(image, np.zeros((40, 60)), 0.0, 1.0, mask=mask)
    assert np.all(out[10, 16:30] == GREEN)  # top edge
    assert np.all(out[10:20, 16] == GREEN)  # left edge
    assert not np.all(out[15, 22] == GREEN)  # inside stays the heatmap
    assert not np.all(out[30, 40] == GREEN)  # far outside too


def test_tiny_defect_outline_survives_downscaling():
    mask = np.zeros((400, 600), bool)
    mask[105, 165] = True
    out = heatmap_overlay(np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60)), 0.0, 1.0, mask=mask)
    assert np.all(out[10, 16] == GREEN)


def test_save_png_round_trip(tmp_path):
    image = _image()
    path = save_png(tmp_path / "sub" / "out.png", image)
    np.testing.assert_array_equal(read_image(path), image)


# -- HTML report ---------------------------------------------------------------------------


@pytest.fixture
def records(tmp_path):
    def record(name, score, label, **kwargs):
        path = save_png(tmp_path / f"{name}.png", _image(seed=len(name)))
        return ImageRecord(str(path), score, label, anomaly_map=np.random.default_rng(2).random((10, 15)), **kwargs)

    mask = np.zeros((40, 60), bool)
    mask[5:15, 5:15] = True
    return [
        record("normal_low", 0.1, 0, defect_type="good"),
        record("normal_high", 0.9, 0, defect_type="good"),
        record("missed", 0.3, 1, defect_type="<script>alert(1)</script>", mask=mask),
        record("found", 0.8, 1, defect_type="scratch", mask=mask, extra_panels={"part map": _image(20, 30)}),
        ImageRecord(str(tmp_path / "gone.png"), 0.95, 1, "scratch", anomaly_map=np.ones((10, 10))),
        ImageRecord(str(tmp_path / "failed.png"), math.nan, None),  # e.g. a file the model could not read
    ]


def test_report_contents(tmp_path, records):
    metrics = {"scratch": {"AUROC": 0.5, "AU-PRO": 0.25}, "all": {"AUROC": 0.98765, "AU-PRO": math.nan}}
    table = [{"shots": 1, "AUROC": "0.912 ± 0.010"}, {"shots": 4, "AUROC": "0.950 ± 0.004"}]
    path = write_report(tmp_path / "out" / "report.html", title="Line 3 <check>", records=records,
                        threshold=0.5, metrics=metrics, table=table, notes=["Method: patchcore"])
    html = path.read_text(encoding="utf-8")
    assert "0.988" in html and "0.500" in html and "0.250" in html and "–" in html
    assert html.index("<td>all</td>") < html.index("<td>scratch</td>")  # "all" row first
    assert "0.912 ± 0.010" in html and "Method: patchcore" in html
    assert "1 of 2 normal images flagged" in html and "1 of 3 anomalous images passed" in html
    # Plots: histogram, ROC, PR + the colour scale. Tiles: misses (all 3 anomalous: 2 + 3 panels,
    # plus the unreadable one's heatmap alone) and false alarms (2 normal x 2 panels).
    assert _embedded_images(html) == 4 + (2 + 3 + 1) + (2 + 2)
    assert "file does not exist" in html
    assert "not scored" in html and "failed.png" not in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "Line 3 &lt;check&gt;" in html
    assert "http://" not in html and "https://" not in html  # self-contained


def test_report_without_labels_or_maps(tmp_path, records):
    plain = [ImageRecord(r.path, r.score, None) for r in records]
    html = write_report(tmp_path / "plain.html", title="Predictions", records=plain, threshold=None,
                        max_examples=2).read_text(encoding="utf-8")
    assert "Highest-scoring images" in html and "ROC" not in html
    # Histogram + the top two images ("gone.png" cannot be read, so it shows text only).
    assert _embedded_images(html) == 1 + 1
    assert "gone.png" in html and "normal_high.png" in html and "normal_low.png" not in html


def test_report_with_no_records(tmp_path):
    html = write_report(tmp_path / "empty.html", title="Nothing", records=[], threshold=0.5).read_text()
    assert "Nothing" in html and _embedded_images(html) == 0


def test_report_overwrite_flag(tmp_path, records):
    path = write_report(tmp_path / "r.html", title="t", records=records, threshold=None)
    write_report(path, title="again", records=records, threshold=None)
    with pytest.raises(FileExistsError):
        write_report(path, title="t", records=records, threshold=None, overwrite=False)


# -- prediction reports ----------------------------------------------------------------------


def test_prediction_records_keep_thumbnail_maps_and_parts_with_their_meaning():
    from defectlens.report import prediction_record
    from defectlens.report.html import REPORT_MAP_SIDE

    anomaly_map = np.zeros((2000, 3000), np.float32)
    anomaly_map[1000:1200, 1500:1800] = 5.0  # a hot region keeps its place when shrunk
    parts = np.zeros((2000, 3000), np.int64)
    parts[:, 1500:] = 3
    record = prediction_record("x.png", 1.5, anomaly_map, parts)
    assert record.anomaly_map.shape == (REPORT_MAP_SIDE * 2 // 3, REPORT_MAP_SIDE)
    row, col = np.unravel_index(np.argmax(record.anomaly_map), record.anomaly_map.shape)
    assert 1000 <= row * 2000 / record.anomaly_map.shape[0] <= 1200 and 1500 <= col * 3000 / REPORT_MAP_SIDE <= 1800
    assert record.extra_panels["parts"].shape == (REPORT_MAP_SIDE * 2 // 3, REPORT_MAP_SIDE, 3)
    assert record.label is None and record.score == 1.5


def test_report_template_is_a_package_file_and_odd_file_names_render(tmp_path):
    import importlib.resources
    import os

    assert importlib.resources.files("defectlens.report").joinpath("templates/report.html.j2").is_file()
    odd = os.fsdecode(b"caf\xe9.png")
    path = write_report(tmp_path / "r.html", title="t", records=[ImageRecord(path=odd, score=1.0, label=None)],
                        threshold=0.5, notes=[f"input {odd}"])
    html = path.read_text(encoding="utf-8")
    assert "caf\\xe9.png" in html and "<title>t</title>" in html
