"""A self-contained HTML report for quality engineers.

One file, no external scripts or styles: plots and image tiles are embedded as base64 PNG, so
the report can be mailed or archived as is. Images are read from disk only for the tiles shown.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import cv2
import jinja2
import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from defectlens import __version__
from defectlens.data.io import ImageReadError, as_image, printable, read_image
from defectlens.errors import OutputExistsError
from defectlens.report.overlay import colorize, colorize_parts, draw_mask_contour, heatmap_overlay, resize_map

TILE_PX = 300
NORMAL_COLOUR = "#2b6cb0"
ANOMALOUS_COLOUR = "#c53030"
UNKNOWN_COLOUR = "#718096"
INK = "#1a202c"
DASH = "–"
# Internal label code for "unknown", so labels fit one integer array.
UNKNOWN = -1


@dataclass
class ImageRecord:
    """One scored image as the report sees it."""

    path: str
    score: float
    label: int | None  # 1 anomalous, 0 normal, None unknown
    defect_type: str = ""
    anomaly_map: np.ndarray | None = None  # any resolution; resized to the image
    mask: np.ndarray | None = None  # bool ground-truth mask, or None
    extra_panels: dict[str, np.ndarray] = field(default_factory=dict)  # shown next to the heatmap


#: Longest side of the maps a prediction report keeps per image: tiles are thumbnails, and a
#: batch of thousands of full-size maps would not fit in memory until the report is written.
REPORT_MAP_SIDE = 512


def prediction_record(path: str, score: float, anomaly_map: np.ndarray | None = None,
                      part_map: np.ndarray | None = None) -> ImageRecord:
    """An unlabelled scored image for a prediction report, its maps shrunk to at most
    :data:`REPORT_MAP_SIDE` (area-averaged heatmap; part classes by nearest neighbour)."""
    small = None
    if anomaly_map is not None:
        scale = min(1.0, REPORT_MAP_SIDE / max(np.shape(anomaly_map)))
        small = resize_map(np.asarray(anomaly_map, np.float32),
                           tuple(max(1, round(n * scale)) for n in np.shape(anomaly_map)))
    panels = {}
    if part_map is not None:
        scale = min(1.0, REPORT_MAP_SIDE / max(part_map.shape))
        height, width = (max(1, round(n * scale)) for n in part_map.shape)
        panels["parts"] = colorize_parts(cv2.resize(part_map.astype(np.int32), (width, height),
                                                    interpolation=cv2.INTER_NEAREST))
    return ImageRecord(path=path, score=score, label=None, anomaly_map=small, extra_panels=panels)


@dataclass
class _Panel:
    caption: str
    png: str | None = None  # base64 PNG
    text: str | None = None  # shown instead of an image when the image cannot be read


@dataclass
class _Tile:
    name: str
    path: str
    score: str
    defect_type: str
    verdict: str
    verdict_class: str  # "good", "bad" or "neutral": colours the verdict badge
    panels: list[_Panel]


@dataclass
class _Section:
    title: str
    caption: str
    tiles: list[_Tile]


# -- formatting ----------------------------------------------------------------------------


def _fmt_metric(value) -> str:
    if value is None:
        return DASH
    if isinstance(value, (float, np.floating)):
        return DASH if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _fmt_score(value: float | None) -> str:
    return DASH if value is None or not math.isfinite(value) else f"{value:.4g}"


def _png_b64(rgb: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode PNG")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def _fit(rgb: np.ndarray, max_px: int) -> np.ndarray:
    """Downscale so the longer side is at most ``max_px``; keeps the report small."""
    height, width = rgb.shape[:2]
    scale = max_px / max(height, width)
    if scale >= 1.0:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


# -- tables --------------------------------------------------------------------------------


def _metric_table(metrics: dict[str, dict[str, float]]) -> dict:
    """Rows "all" first, then each defect type; columns = every metric name, in first-seen order."""
    row_names = sorted(metrics, key=lambda name: name != "all")
    columns = list(dict.fromkeys(name for row in metrics.values() for name in row))
    rows = [[name] + [_fmt_metric(metrics[name].get(column)) for column in columns] for name in row_names]
    return {"columns": ["defect type"] + columns, "rows": rows}


def _extra_table(table: list[dict]) -> dict:
    columns = list(dict.fromkeys(key for row in table for key in row))
    rows = [[_fmt_metric(row.get(column)) for column in columns] for row in table]
    return {"columns": [str(column) for column in columns], "rows": rows}


def _confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts at the threshold; as in Prediction.labels, a score above the threshold is flagged."""
    flagged = scores > threshold
    return {
        "detected": int(np.sum(flagged & (labels == 1))),
        "missed": int(np.sum(~flagged & (labels == 1))),
        "false_alarms": int(np.sum(flagged & (labels == 0))),
        "passed": int(np.sum(~flagged & (labels == 0))),
        "unknown_flagged": int(np.sum(flagged & (labels == UNKNOWN))),
        "unknown_passed": int(np.sum(~flagged & (labels == UNKNOWN))),
    }


def _rate(numerator: int, denominator: int) -> str:
    return DASH if denominator == 0 else f"{numerator / denominator:.1%}"


def _summary(scores: np.ndarray, labels: np.ndarray, threshold: float | None, n_unscored: int) -> list[tuple[str, str]]:
    """The headline numbers shown as cards at the top of the page."""
    cards = [("images", str(len(scores) + n_unscored))]
    cards += [(name, str(int(np.sum(labels == code)))) for name, code in
              (("anomalous", 1), ("normal", 0), ("unlabelled", UNKNOWN)) if np.any(labels == code)]
    if n_unscored:
        cards.append(("not scored", str(n_unscored)))
    if threshold is not None:
        cards.append(("threshold", _fmt_score(threshold)))
    if _has_both_classes(labels):
        known = labels != UNKNOWN
        cards.append(("AUROC", f"{roc_auc_score(labels[known], scores[known]):.3f}"))
    if threshold is not None and np.any(labels != UNKNOWN):
        counts = _confusion(scores, labels, threshold)
        cards.append(("detection rate", _rate(counts["detected"], counts["detected"] + counts["missed"])))
        cards.append(("false alarm rate", _rate(counts["false_alarms"], counts["false_alarms"] + counts["passed"])))
    return cards


# -- plots ---------------------------------------------------------------------------------

_PLOT_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
}


def _plot_png(draw: Callable, *args) -> str:
    """Draw on a fresh Figure (no pyplot, so no global backend state) and return base64 PNG."""
    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=(4.6, 3.3), dpi=120, layout="constrained")
        draw(figure.add_subplot(), *args)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_UNIT = (-0.01, 1.01)  # axis limits for rates, with room for markers on the edges


def _has_both_classes(labels: np.ndarray) -> bool:
    return bool(np.any(labels == 0) and np.any(labels == 1))


def _draw_roc(ax, scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> None:
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot(fpr, tpr, color=ANOMALOUS_COLOUR, lw=1.8, label=f"AUROC = {roc_auc_score(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=UNKNOWN_COLOUR, label="chance")
    if threshold is not None:
        flagged = scores > threshold
        ax.plot(np.mean(flagged[labels == 0]), np.mean(flagged[labels == 1]), "o", color=INK,
                label=f"threshold {_fmt_score(threshold)}")
    ax.set(title="ROC", xlabel="false alarm rate (FPR)", ylabel="detection rate (TPR)", xlim=_UNIT, ylim=_UNIT)
    ax.legend(loc="lower right")


def _draw_pr(ax, scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> None:
    precision, recall, _ = precision_recall_curve(labels, scores)
    ax.step(recall, precision, where="post", color=ANOMALOUS_COLOUR, lw=1.8,
            label=f"AP = {average_precision_score(labels, scores):.3f}")
    prevalence = np.mean(labels == 1)
    ax.axhline(prevalence, ls="--", lw=0.8, color=UNKNOWN_COLOUR, label=f"chance ({prevalence:.2f})")
    flagged = scores > threshold if threshold is not None else None
    if flagged is not None and flagged.any():
        ax.plot(np.mean(flagged[labels == 1]), np.mean(labels[flagged] == 1), "o", color=INK,
                label=f"threshold {_fmt_score(threshold)}")
    ax.set(title="Precision–recall", xlabel="recall (detection rate)", ylabel="precision", xlim=_UNIT, ylim=_UNIT)
    ax.legend(loc="lower left")


def _draw_histogram(ax, scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> None:
    values = scores if threshold is None else np.append(scores, threshold)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, int(np.clip(np.sqrt(len(scores)) * 2, 10, 50)) + 1)
    for name, code, colour in (("normal", 0, NORMAL_COLOUR), ("anomalous", 1, ANOMALOUS_COLOUR),
                               ("unlabelled", UNKNOWN, UNKNOWN_COLOUR)):
        group = scores[labels == code]
        if group.size:
            ax.hist(group, bins=edges, histtype="stepfilled", alpha=0.45, color=colour, edgecolor=colour,
                    linewidth=1.2, label=f"{name} ({group.size})")
    if threshold is not None:
        ax.axvline(threshold, color=INK, ls="--", lw=1.2, label=f"threshold {_fmt_score(threshold)}")
    ax.set(title="Score distribution", xlabel="anomaly score (higher = more anomalous)", ylabel="images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper right")


def _histogram_caption(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> str:
    if threshold is None:
        return f"Scores of {len(scores)} images. No decision threshold was given."
    counts = _confusion(scores, labels, threshold)
    parts = []
    n_normal, n_anomalous = counts["false_alarms"] + counts["passed"], counts["detected"] + counts["missed"]
    if n_normal:
        parts.append(f"{counts['false_alarms']} of {n_normal} normal images flagged (false alarms)")
    if n_anomalous:
        parts.append(f"{counts['missed']} of {n_anomalous} anomalous images passed (misses)")
    n_unknown = counts["unknown_flagged"] + counts["unknown_passed"]
    if n_unknown:
        parts.append(f"{counts['unknown_flagged']} of {n_unknown} unlabelled images flagged")
    return f"At threshold {_fmt_score(threshold)} (score above it = flagged): " + "; ".join(parts) + "."


def _plots(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict:
    plots = {"histogram": _plot_png(_draw_histogram, scores, labels, threshold),
             "histogram_caption": _histogram_caption(scores, labels, threshold), "curves": []}
    if _has_both_classes(labels):
        known = labels != UNKNOWN
        plots["curves"] = [_plot_png(draw, scores[known], labels[known], threshold) for draw in (_draw_roc, _draw_pr)]
    return plots


# -- example tiles -------------------------------------------------------------------------


def default_map_range(records: Sequence[ImageRecord]) -> tuple[float, float] | None:
    """One colour scale for every overlay, from the normal images' maps: colour starts at the 99th
    percentile of their pixels (so normal texture stays calm) and saturates at the 99th percentile
    of their per-image peaks (so red means "as high as the worst normal image gets"). Without
    labelled normal images all maps are used. None when no record has a map.

    Callers whose image score is the map maximum may prefer ``(that vmin, threshold)``.
    """
    maps = [r.anomaly_map for r in records if r.anomaly_map is not None and r.label == 0]
    maps = maps or [r.anomaly_map for r in records if r.anomaly_map is not None]
    maps = [m for m in (np.asarray(m, dtype=np.float32) for m in maps) if np.isfinite(m).any()]
    if not maps:
        return None
    # A strided subsample per map keeps this cheap for hundreds of megapixel maps.
    pixels = np.concatenate([_subsample(m) for m in maps])
    low = float(np.quantile(pixels[np.isfinite(pixels)], 0.99))
    high = float(np.quantile([m[np.isfinite(m)].max() for m in maps], 0.99))
    return (low, high) if high > low else (low, low + max(abs(low), 1.0) * 1e-3)


def _subsample(values: np.ndarray, target: int = 128) -> np.ndarray:
    step = max(1, max(values.shape) // target)
    return values[::step, ::step].ravel()


def _verdict(record: ImageRecord, threshold: float | None) -> tuple[str, str]:
    label = {1: "anomalous", 0: "normal", None: "unlabelled"}[record.label]
    if threshold is None:
        return label, "neutral"
    flagged = record.score > threshold
    if record.label is None:
        return ("flagged", "neutral") if flagged else ("passed", "neutral")
    if record.label == 1:
        return ("detected", "good") if flagged else ("missed", "bad")
    return ("false alarm", "bad") if flagged else ("passed", "good")


def _image_panels(record: ImageRecord, map_range: tuple[float, float] | None, tile_px: int) -> list[_Panel]:
    try:
        # Decode at a bounded size: tiles are thumbnails even when the inputs are huge.
        image = _fit(read_image(record.path, max_side=4 * tile_px), tile_px)
    except ImageReadError as error:
        image = None
        panels = [_Panel("image", text=f"Cannot show this image: {error.problem}")]
    else:
        panels = [_Panel("image", png=_png_b64(image))]
    if record.anomaly_map is not None and map_range is not None:
        if image is None:
            # The heatmap alone still shows where the model looked.
            height, width = np.shape(record.anomaly_map)
            base = _fit(np.zeros((height, width, 3), np.uint8), tile_px)
            heatmap = heatmap_overlay(base, record.anomaly_map, *map_range, alpha=1.0, mask=record.mask)
            panels.append(_Panel("heatmap", png=_png_b64(heatmap)))
        else:
            overlay = heatmap_overlay(image, record.anomaly_map, *map_range, mask=record.mask)
            caption = "heatmap, defect outlined" if record.mask is not None and np.any(record.mask) else "heatmap"
            panels.append(_Panel(caption, png=_png_b64(overlay)))
    elif record.mask is not None and image is not None:
        panels.append(_Panel("defect outlined", png=_png_b64(draw_mask_contour(image, record.mask))))
    for name, panel in record.extra_panels.items():
        try:
            panels.append(_Panel(str(name), png=_png_b64(_fit(as_image(panel), tile_px))))
        except ValueError as error:
            panels.append(_Panel(str(name), text=f"Cannot show this panel: {error}"))
    return panels


def _tile(record: ImageRecord, threshold: float | None, map_range, tile_px: int) -> _Tile:
    verdict, verdict_class = _verdict(record, threshold)
    return _Tile(name=printable(Path(record.path).name), path=printable(record.path), score=_fmt_score(record.score),
                 defect_type=record.defect_type, verdict=verdict, verdict_class=verdict_class,
                 panels=_image_panels(record, map_range, tile_px))


def _pick_examples(records: list[ImageRecord], threshold: float | None, n: int) -> list[tuple[str, str, list]]:
    """(title, caption, records) for each example section, most informative first."""
    by_score = sorted(records, key=lambda r: r.score)
    anomalous = [r for r in by_score if r.label == 1]
    normal = [r for r in by_score if r.label == 0]
    unknown = [r for r in by_score if r.label is None]
    if not anomalous and not normal:
        top = unknown[::-1][:n]
        return [("Highest-scoring images", "The images the model finds most anomalous.", top)] if top else []

    def below(group):  # how many of a group fall on the "passed" side of the threshold
        if threshold is None:
            return ""
        return f" {sum(r.score <= threshold for r in group)} of {len(group)} pass the threshold."

    misses = anomalous[:n]
    shown = {id(r) for r in misses}
    sections = [
        ("Worst misses", "Anomalous images with the lowest scores." + below(anomalous), misses),
        ("Worst false alarms", "Normal images with the highest scores." + below(normal), normal[::-1][:n]),
        ("Most confident detections", "Anomalous images with the highest scores.",
         [r for r in anomalous[::-1] if id(r) not in shown][:n]),
        ("Highest-scoring unlabelled images", "Images without a known label.", unknown[::-1][:n]),
    ]
    return [section for section in sections if section[2]]


def _examples(records: list[ImageRecord], threshold: float | None, n: int, map_range, tile_px: int) -> list[_Section]:
    return [_Section(title, caption, [_tile(r, threshold, map_range, tile_px) for r in chosen])
            for title, caption, chosen in _pick_examples(records, threshold, n)]


def _colour_scale(map_range: tuple[float, float]) -> dict:
    gradient = np.tile(np.linspace(map_range[0], map_range[1], 256, dtype=np.float32), (12, 1))
    return {"png": _png_b64(colorize(gradient, *map_range)), "low": _fmt_score(map_range[0]),
            "high": _fmt_score(map_range[1])}


# -- page ----------------------------------------------------------------------------------


def write_report(
    path: str | os.PathLike,
    *,
    title: str,
    records: Sequence[ImageRecord],
    threshold: float | None,
    metrics: dict[str, dict[str, float]] | None = None,
    table: list[dict] | None = None,
    notes: Sequence[str] = (),
    max_examples: int = 8,
    overwrite: bool = True,
    table_title: str = "Benchmark",
    map_range: tuple[float, float] | None = None,
    tile_px: int = TILE_PX,
) -> Path:
    """Write a single self-contained HTML report and return its path.

    ``metrics`` maps "all" and each defect type to {metric name: value}; ``table`` is an
    optional list of row dicts (e.g. a k-shot benchmark) shown under ``table_title``.
    ``map_range`` (vmin, vmax) fixes the heatmap colour scale; by default it comes from the
    normal images' maps (see :func:`default_map_range`). ``max_examples`` tiles per section.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    scored = [r for r in records if r.score is not None and math.isfinite(r.score)]
    scores = np.array([r.score for r in scored], dtype=np.float64)
    labels = np.array([UNKNOWN if r.label is None else int(r.label) for r in scored], dtype=np.int64)
    map_range = map_range if map_range is not None else default_map_range(scored)
    context = {
        "title": printable(title),
        "notes": [printable(note) for note in notes],
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": __version__,
        "cards": _summary(scores, labels, threshold, len(records) - len(scored)),
        "metric_table": _metric_table(metrics) if metrics else None,
        "extra_table": _extra_table(table) if table else None,
        "table_title": table_title,
        "confusion": _confusion(scores, labels, threshold) if threshold is not None and len(scored) else None,
        "plots": _plots(scores, labels, threshold) if len(scored) else None,
        "colour_scale": _colour_scale(map_range) if map_range is not None else None,
        "sections": _examples(scored, threshold, max_examples, map_range, tile_px),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_environment().get_template("report.html.j2").render(**context), encoding="utf-8")
    return path


@functools.cache
def _environment() -> jinja2.Environment:
    # The template ships as package data (templates/*.j2, see pyproject.toml).
    return jinja2.Environment(loader=jinja2.PackageLoader("defectlens.report", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True)
