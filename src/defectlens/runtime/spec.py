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


def read_spec(export_dir: str | os.PathLike) -> dict:
    path = Path(export_dir) / SPEC_FILE
    if not path.is_file():
        raise UsageError(f"{export_dir}: not a defectlens export folder (no {SPEC_FILE}); write one with `defectlens export`")
    return json.loads(path.read_text())
