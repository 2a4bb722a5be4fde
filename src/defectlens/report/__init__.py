"""Reports: heatmap overlays and a self-contained HTML report."""

from defectlens.report.benchmark import (
    TABLE_COLUMNS,
    json_default,
    table_columns,
    write_benchmark_json,
    write_benchmark_report,
)
from defectlens.report.html import ImageRecord, default_map_range, prediction_record, write_report
from defectlens.report.overlay import (
    colorize,
    colorize_parts,
    draw_mask_contour,
    heatmap_overlay,
    resize_map,
    save_png,
)

__all__ = [
    "TABLE_COLUMNS",
    "ImageRecord",
    "colorize",
    "colorize_parts",
    "default_map_range",
    "draw_mask_contour",
    "heatmap_overlay",
    "json_default",
    "prediction_record",
    "resize_map",
    "save_png",
    "table_columns",
    "write_benchmark_json",
    "write_benchmark_report",
    "write_report",
]
