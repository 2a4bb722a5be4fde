"""Benchmark results as files: the JSON record, the HTML report, the columns of the printed table.

Shared by the CLI, the demo and the scripts under benchmarks/, so all of them write the same
shape.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .html import write_report

if TYPE_CHECKING:  # engine.benchmark builds its records with this package
    from ..engine.benchmark import BenchmarkResult

#: Columns of the k-shot table, in order; per-group AUROC and sPRO columns follow when present.
TABLE_COLUMNS = ["shots", "seeds", "image_auroc", "image_aupr", "f1_max", "pixel_auroc", "au_pro",
                 "fpr_at_threshold", "tpr_at_threshold", "fit_seconds", "score_ms_per_image"]


def table_columns(table: list[dict]) -> list[str]:
    """:data:`TABLE_COLUMNS` plus the per-group columns (``image_auroc[...]``, ``au_spro...``) a
    table holds."""
    extra = [column for column in table[0] if column.startswith(("image_auroc[", "au_spro"))] if table else []
    return TABLE_COLUMNS + extra


def jsonable(value):
    """``value`` with numpy numbers as plain ones and NaN or infinite numbers as None (null), so
    that ``json.dumps(..., allow_nan=False)`` writes strict JSON that every reader parses."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_benchmark_json(path: str | os.PathLike, result: BenchmarkResult) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result.to_json()), indent=2, allow_nan=False))
    return path


def write_benchmark_report(path: str | os.PathLike, result: BenchmarkResult, table: list[dict]) -> Path:
    """The HTML report of a benchmark: the k-shot ``table``, and the last run's metrics, curves
    and example tiles."""
    last = result.runs[-1]
    backbone = result.params.get("backbone", "–")
    return write_report(path, title=f"defectlens benchmark — {result.method} on {result.category}",
                        records=result.records, threshold=result.threshold, metrics=last["metrics"], table=table,
                        table_title="k-shot protocol (mean ± std over seeds)",
                        notes=[f"data: {result.dataset}", f"backbone {backbone} at {result.params.get('size', '–')} px",
                               f"examples and curves: the last run ({last['shots']} shots, seed {last['seed']})"])
