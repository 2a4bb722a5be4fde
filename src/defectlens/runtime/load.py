"""Pick the runtime a detector's backbone runs on: PyTorch, ONNX Runtime or OpenVINO."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

from .. import __version__
from ..errors import UsageError
from .backbones import open_exported
from .export import NotExportableError, check_exportable, export_backbone
from .spec import SPEC_FILE, BrokenExportError, read_spec

RUNTIMES = ("auto", "torch", "onnx", "openvino")
# Fastest first: "auto" takes the first one installed. The default's whole predict process on
# BSData (benchmarks/results/speed.md, speed_tiles.md, 2026-12-01): ONNX Runtime 21.6 / 256.8
# ms/img at 256 px / in 18 tiles, OpenVINO 23.6 / 273.4; with maps level; lower peak memory.
PREFERENCE = ("onnx", "openvino")
MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


def installed(runtime: str) -> bool:
    return runtime == "torch" or importlib.util.find_spec(MODULES[runtime]) is not None


def cache_dir() -> Path:
    """Where exports made on demand are kept (``DEFECTLENS_CACHE``, else ~/.cache/defectlens)."""
    return Path(os.environ.get("DEFECTLENS_CACHE") or Path.home() / ".cache" / "defectlens") / "exports"


def load_runtime(detector, runtime: str = "auto", export_dir: str | os.PathLike | None = None,
                 export_missing: bool = True, fitting: bool = False):
    """Run ``detector``'s backbone on ``runtime`` and return the detector.

    "auto" takes the fastest installed runtime the detector can use and keeps PyTorch for
    methods that cannot be exported; naming a runtime makes those an error. Without
    ``export_dir`` the backbone is exported once into the cache (about 10 s) and reused;
    ``export_missing=False`` makes "auto" keep PyTorch instead when the cache has no export yet
    (for work too short to pay for one, e.g. a fit on a few hundred images). ``fitting``: the
    backbone embeds the training images once, and its runtime frees their memory after each batch
    instead of holding it for the next (``ExportedBackbone``'s ``hold_memory``).
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
        if export_dir is None and not export_missing:
            formats = [name for name in formats if (cached_export(detector, name) / SPEC_FILE).is_file()]
        runtime = next((name for name in formats if installed(name)), "torch")
        if runtime == "torch":
            return detector
    check_exportable(detector)
    if not installed(runtime):
        raise UsageError(f"runtime '{runtime}' is not installed: pip install {MODULES[runtime]} "
                           "(or defectlens[export] for both)")
    if export_dir is not None:
        detector.backbone_network = _opened(export_dir, detector, runtime, fitting)
        return detector
    export_dir = cached_export(detector, runtime)
    if not (export_dir / SPEC_FILE).is_file():
        _export_to_cache(detector, runtime, export_dir)
    try:
        detector.backbone_network = _opened(export_dir, detector, runtime, fitting)
    except BrokenExportError as error:
        # A cached export cut short (a full disk, a killed process) would fail every later run:
        # the cache is ours, so it is made again.
        print(f"defectlens: {error}; the cached export is made again", file=sys.stderr)
        shutil.rmtree(export_dir, ignore_errors=True)
        _export_to_cache(detector, runtime, export_dir)
        detector.backbone_network = _opened(export_dir, detector, runtime, fitting)
    return detector


def _export_to_cache(detector, runtime: str, export_dir: Path) -> None:
    try:
        export_backbone(detector.backbone, detector.size, export_dir, runtime)
    except FileExistsError:
        pass  # exported by another process meanwhile


def _opened(export_dir: str | os.PathLike, detector, runtime: str, fitting: bool):
    """The backbone of the export in ``export_dir``, checked to be what ``detector`` needs."""
    spec = read_spec(export_dir)
    name, size = detector.backbone, detector.size
    if spec["format"] != runtime:
        raise UsageError(f"{export_dir} holds an {spec['format']} export, not {runtime}")
    expected = [size, size] if isinstance(size, int) else list(size)
    if spec["backbone"] != name or spec["input_hw"] != expected:
        raise UsageError(f"{export_dir} exports {spec['backbone']} at {spec['input_hw']} px; the model needs {name} at {expected}")
    try:
        return open_exported(export_dir, hold_memory=not fitting)
    except Exception as error:  # noqa: BLE001 - each runtime raises its own types for an unreadable graph
        raise BrokenExportError(f"{export_dir}: its {runtime} graph cannot be loaded ({type(error).__name__}: "
                                f"{error}); export again") from None


def cached_export(detector, runtime: str) -> Path:
    """Where the cache keeps the export of ``detector``'s backbone for ``runtime``."""
    return cache_dir() / f"{detector.backbone}-{detector.size}-{runtime}-defectlens{__version__}-torch{torch.__version__}"


def runtime_of(detector) -> str:
    """The runtime ``detector``'s backbone runs on now: torch unless an export was loaded."""
    return getattr(getattr(detector, "_backbone", None), "runtime", "torch")
