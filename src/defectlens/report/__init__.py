"""Reports: heatmap overlays and a self-contained HTML report."""

from defectlens.report.html import ImageRecord, default_map_range, write_report
from defectlens.report.overlay import (
    colorize,
    colorize_parts,
    draw_mask_contour,
    heatmap_overlay,
    resize_map,
    save_png,
)

__all__ = [
    "ImageRecord",
    "colorize",
    "colorize_parts",
    "default_map_range",
    "draw_mask_contour",
    "heatmap_overlay",
    "resize_map",
    "save_png",
    "write_report",
]
