"""The HTML report of the unified incremental protocol (``benchmark --incremental``): the ACC / FM
summary, and for each method a plot of every object's AUROC across the steps next to the per-step
tables A[b, i] it is drawn from. Self-contained like the other reports (plots embedded as PNG).
"""

from __future__ import annotations

import base64
import io
import math
import os
from datetime import datetime
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from defectlens import __version__
from defectlens.data.io import printable
from defectlens.errors import OutputExistsError
from defectlens.report.html import _PLOT_STYLE, DASH, UNKNOWN_COLOUR, _environment

LEVELS = ("image", "pixel")


def _points(value) -> str:
    return DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def auroc_lines(matrix) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each object (column of A[b, i]), the steps (1-based) it was evaluated at and its AUROC
    there in points: the line the plot draws, from the step that learned it to the last."""
    matrix = np.asarray(matrix, dtype=np.float64)
    lines = []
    for column in matrix.T:
        seen = ~np.isnan(column)
        lines.append((np.flatnonzero(seen) + 1, 100 * column[seen]))
    return lines


def auroc_figure(matrix, objects: list[str], title: str) -> Figure:
    """Each object's AUROC (points) after each step, one line per object; forgetting shows as a
    line that falls after its first point."""
    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=(6.4, 3.6), dpi=120, layout="constrained")
        ax = figure.add_subplot()
        colours = matplotlib.colormaps["tab20"]
        for i, (name, (steps, values)) in enumerate(zip(objects, auroc_lines(matrix))):
            ax.plot(steps, values, marker="o", markersize=3, lw=1.4, color=colours(i % 20), label=name)
        ax.axhline(50, ls="--", lw=0.8, color=UNKNOWN_COLOUR)
        ax.set(title=title, xlabel="after step", ylabel="AUROC (points)", ylim=(-2, 102))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, handlelength=1.5)
    return figure


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _step_table(matrix, objects: list[str]) -> dict:
    rows = [[str(b + 1)] + ["" if math.isnan(v) else f"{100 * v:.1f}" for v in row] for b, row in enumerate(matrix)]
    return {"columns": ["after step"] + list(objects), "rows": rows}


def _summary_table(methods: dict) -> dict:
    rows = [[method, _points(f.get("acc_image")), _points(f.get("fm_image")), _points(f.get("acc_pixel")),
             _points(f.get("fm_pixel")), f"{sum(f.get('step_seconds', [])):.1f}"] for method, f in methods.items()]
    return {"columns": ["method", "ACC image", "FM image", "ACC pixel", "FM pixel", "learning s (all steps)"],
            "rows": rows}


def _routing_notes(routing: dict) -> list[str]:
    notes = []
    if "accuracy" in routing:
        notes.append(f"unified bank routing: {100 * routing['accuracy']:.2f} % of {routing['images']} test images of "
                     f"known products go to their product; normal images called unknown "
                     f"{100 * routing['normal_called_unknown']:.1f} %, anomalous {100 * routing['anomalous_called_unknown']:.1f} %")
    if "unknown_after_step_1" in routing:
        unknown = routing["unknown_after_step_1"]
        notes.append(f"unknown products: after step 1, {100 * unknown['flagged_unknown']:.1f} % of the "
                     f"{unknown['images']} test images of not-yet-learned objects are flagged unknown")
    return notes


def write_incremental_report(path: str | os.PathLike, result, overwrite: bool = True) -> Path:
    """Write the report of an ``IncrementalResult`` (engine/incremental.py) and return its path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    objects = list(result.settings["objects"])
    steps = [f"step {b + 1}: {', '.join(names)}" for b, names in enumerate(result.steps)]
    sections = []
    for method, figures in result.methods.items():
        levels = []
        for level in LEVELS:
            matrix = np.array(figures[level], dtype=np.float64)
            figure = auroc_figure(matrix, objects, f"{method}: {level} AUROC per object")
            levels.append({"name": level, "plot": _png(figure), "table": _step_table(matrix, objects)})
        sections.append({"method": printable(method), "levels": levels})
    context = {
        "title": printable(f"defectlens incremental benchmark — schedule {result.schedule}"),
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "version": __version__,
        "notes": [printable(note) for note in
                  [f"{len(objects)} objects in {len(result.steps)} steps", *steps, *_routing_notes(result.routing)]],
        "summary": _summary_table(result.methods),
        "sections": sections,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_environment().get_template("incremental.html.j2").render(**context), encoding="utf-8")
    return path
