"""An export folder's layout: which file holds the graph in each format, and ``export.json``,
what the graph computes (backbone, input size, feature levels) and how close to PyTorch it was
measured when it was written. Read by the loaders, written by ``export``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError

FORMATS = ("onnx", "openvino")
GRAPH_FILES = {"onnx": "features.onnx", "openvino": "features.xml"}
SPEC_FILE = "export.json"


#: What ``export.json`` must say for an export to be opened.
SPEC_KEYS = ("format", "backbone", "input_hw", "stride", "levels", "feature_dim", "mean", "std")


class BrokenExportError(UsageError):
    """An export folder whose files cannot be read (cut short, edited, another tool's)."""


def read_spec(export_dir: str | os.PathLike) -> dict:
    path = Path(export_dir) / SPEC_FILE
    if not path.is_file():
        raise UsageError(f"{export_dir}: not a defectlens export folder (no {SPEC_FILE}); write one with `defectlens export`")
    try:
        spec = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BrokenExportError(f"{path} is not valid JSON ({error}); export again") from None
    missing = [key for key in SPEC_KEYS if not isinstance(spec, dict) or key not in spec]
    if missing or spec["format"] not in FORMATS:
        raise BrokenExportError(f"{path} is not a defectlens export description (missing or wrong: "
                                f"{', '.join(missing) or 'format'}); export again")
    return spec
