"""Pick the runtime a detector's backbone runs on: PyTorch, ONNX Runtime or OpenVINO."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .. import __version__
from ..errors import UsageError
from .backbones import open_exported
from .export import SPEC_FILE, NotExportableError, check_exportable, export_backbone, read_spec

RUNTIMES = ("auto", "torch", "onnx", "openvino")
# Fastest first (benchmarks/results/runtime_speed.md): "auto" takes the first one installed.
PREFERENCE = ("openvino", "onnx")
MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


def installed(runtime: str) -> bool:
    return runtime == "torch" or importlib.util.find_spec(MODULES[runtime]) is not None


def cache_dir() -> Path:
    """Where exports made on demand are kept (``DEFECTLENS_CACHE``, else ~/.cache/defectlens)."""
    return Path(os.environ.get("DEFECTLENS_CACHE") or Path.home() / ".cache" / "defectlens") / "exports"


def load_runtime(detector, runtime: str = "auto", export_dir: str | os.PathLike | None = None):
    """Run ``detector``'s backbone on ``runtime`` and return the detector.

    "auto" takes the fastest installed runtime the detector can use and keeps PyTorch for
    methods that cannot be exported; naming a runtime makes those an error. Without
    ``export_dir`` the backbone is exported once into the cache (about 10 s) and reused.
    """
    if runtime not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "torch":
        return detector
    if runtime == "auto":
        try:
            check_exportable(detector)
        except NotExportableError:
            return detector
        formats = [read_spec(export_dir)["format"]] if export_dir is not None else PREFERENCE
        runtime = next((name for name in formats if installed(name)), "torch")
        if runtime == "torch":
            return detector
    check_exportable(detector)
    if not installed(runtime):
        raise UsageError(f"runtime '{runtime}' is not installed: pip install {MODULES[runtime]} "
                           "(or defectlens[export] for both)")
    name, size = detector.backbone, detector.size
    if export_dir is None:
        export_dir = cache_dir() / f"{name}-{size}-{runtime}-defectlens{__version__}-torch{torch.__version__}"
        if not (export_dir / SPEC_FILE).is_file():
            try:
                export_backbone(name, size, export_dir, runtime)
            except FileExistsError:
                pass  # exported by another process meanwhile
    spec = read_spec(export_dir)
    if spec["format"] != runtime:
        raise UsageError(f"{export_dir} holds a {spec['format']} export, not {runtime}")
    expected = [size, size] if isinstance(size, int) else list(size)
    if spec["backbone"] != name or spec["input_hw"] != expected:
        raise UsageError(f"{export_dir} exports {spec['backbone']} at {spec['input_hw']} px; the model needs {name} at {expected}")
    detector.backbone_network = open_exported(export_dir)
    return detector
