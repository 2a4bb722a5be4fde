"""Reports: heatmap overlays and a self-contained HTML report.

Names are imported from their module on first use: the HTML report pulls in matplotlib and
scikit-learn (about a second), which a `predict` writing only a CSV or overlays never needs.
"""

from importlib import import_module

_HOMES = {
    "TABLE_COLUMNS": "benchmark", "jsonable": "benchmark", "table_columns": "benchmark",
    "write_benchmark_json": "benchmark", "write_benchmark_report": "benchmark",
    "ImageRecord": "html", "default_map_range": "html", "prediction_record": "html", "write_report": "html",
    "colorize": "overlay", "colorize_parts": "overlay", "draw_mask_contour": "overlay", "heatmap_overlay": "overlay",
    "resize_map": "overlay", "save_png": "overlay",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
