"""Benchmark results as files: the JSON record, the HTML report, the columns of the printed table.

Shared by the CLI, the demo and the scripts under benchmarks/, so all of them write the same
shape.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from defectlens.report.html import ImageRecord, write_report

#: Columns of the k-shot table, in order; per-group AUROC and sPRO columns follow when present.
TABLE_COLUMNS = ["shots", "seeds", "image_auroc", "image_aupr", "f1_max", "pixel_auroc", "au_pro",
                 "fpr_at_threshold", "tpr_at_threshold", "fit_seconds", "score_ms_per_image"]


def table_columns(table: list[dict]) -> list[str]:
    """:data:`TABLE_COLUMNS` plus the per-group columns (``image_auroc[...]``, ``au_spro...``) a
    table holds."""
    extra = [column for column in table[0] if column.startswith(("image_auroc[", "au_spro"))] if table else []
    return TABLE_COLUMNS + extra


def json_default(value):
    """``json.dumps(default=...)`` for benchmark results: numpy numbers as plain numbers."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_benchmark_json(path: str | os.PathLike, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=json_default))
    return path


def write_benchmark_report(path: str | os.PathLike, result: dict, records: list[ImageRecord], threshold: float | None,
                           table: list[dict]) -> Path:
    """The HTML report of a benchmark: the k-shot ``table``, and the last run's metrics, curves
    and example tiles (``records`` with ``threshold``)."""
    last = result["runs"][-1]
    return write_report(path, title=f"defectlens benchmark — {result['method']} on {result['category']}",
                        records=records, threshold=threshold, metrics=last["metrics"], table=table,
                        table_title="k-shot protocol (mean ± std over seeds)",
                        notes=[f"data: {result['dataset']}", f"backbone {result['backbone']} at {result['size']} px",
                               f"examples and curves: the last run ({last['shots']} shots, seed {last['seed']})"])
