"""Export a model's backbone feature graph to ONNX or OpenVINO IR, checked against PyTorch.

An export folder holds the graph (``features.onnx``, or ``features.xml`` + ``.bin``) and
``export.json``: what the graph computes (backbone, input size, feature levels) and the largest
feature difference from PyTorch measured when it was written. Scoring stays in the model file
(faiss and torch): a kNN in the graph was measured slower (benchmarks/results/runtime_speed.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import OutputError, OutputExistsError, UsageError
from ..backbones import EFFICIENTNET_LITE_VARIANTS, get_backbone, is_efficientnet_lite_name
from .backbones import open_exported
from .graph import FeatureGraph
from .spec import FORMATS, GRAPH_FILES, SPEC_FILE

#: What an export folder may hold: ``--overwrite`` replaces a folder of these files only.
EXPORT_FILES = frozenset({SPEC_FILE, *GRAPH_FILES.values(), "features.bin"})

#: Largest absolute feature difference from PyTorch an export may have (features are O(10)).
FEATURE_TOLERANCE = 1e-3

# Methods whose only use of the backbone is ``embed`` at one fixed input size: swapping in an
# exported backbone gives them the same predictions. The others say why they cannot be exported.
EXPORTABLE_METHODS = ("composition", "ensemble", "padim", "patchcore", "patchknn", "spade")
NOT_EXPORTABLE = {
    "gcad": "it trains its student networks on the backbone's torch modules and runs them in its own graph",
    "musc": "it picks the backbone's input size per batch from the images' aspect ratio",
    "destseg": "its trained segmentation network is not part of the backbone feature graph",
    "draem": "it is a trained reconstruction network, not a backbone feature graph",
    "faprompt": "it scores with CLIP from Hugging Face, not with the embedded backbone",
    "winclip": "it scores with CLIP from Hugging Face, not with the embedded backbone",
}


class NotExportableError(UsageError):
    """The method or backbone of a model has no exportable feature graph."""


def check_exportable(detector) -> None:
    """Raise NotExportableError naming the reason when ``detector`` cannot run on an export."""
    method = detector.name
    if method not in EXPORTABLE_METHODS:
        reason = NOT_EXPORTABLE.get(method, "it does not score backbone features only")
        raise NotExportableError(f"method '{method}' cannot run on an exported runtime: {reason}. "
                                 f"Exportable methods: {', '.join(EXPORTABLE_METHODS)}")
    backbone = getattr(detector, "backbone", None)
    if not is_efficientnet_lite_name(backbone):
        raise NotExportableError(f"backbone '{backbone}' cannot be exported; exportable: "
                                 f"{', '.join(sorted(EFFICIENTNET_LITE_VARIANTS))} (with any @STAGES)")


def export_backbone(name: str, size: int | tuple[int, int], out_dir: str | os.PathLike, format: str = "onnx",
                    overwrite: bool = False) -> Path:
    """Write the feature graph of backbone ``name`` at ``size`` to ``out_dir`` in ``format``.

    Written into a temporary folder beside ``out_dir`` and renamed at the end, so that a
    half-written export is never read (several processes may export to one cache at once).
    ``overwrite`` replaces an earlier export there, never a folder holding anything else.
    """
    if format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    out_dir = Path(os.path.abspath(out_dir))  # "." and "dir/" get a name to stage beside
    check_export_target(out_dir, overwrite)
    backbone = get_backbone(name, size)
    graph = FeatureGraph(backbone).eval()
    height, width = backbone.input_hw
    sample = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        onnx_path = staging / GRAPH_FILES["onnx"]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(graph, (sample,), str(onnx_path), input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=17,
                              dynamo=False)
        if format == "openvino":
            import openvino as ov

            # Weights stay float32 (save_model would halve them by default): parity with PyTorch first.
            ov.save_model(ov.convert_model(str(onnx_path)), str(staging / GRAPH_FILES["openvino"]), compress_to_fp16=False)
            onnx_path.unlink()
        spec = {"format": format, "backbone": name, "input_hw": [height, width], "stride": backbone.stride,
                "levels": [list(level) for level in backbone.levels], "feature_dim": backbone.feature_dim,
                "mean": list(backbone.mean), "std": list(backbone.std), "defectlens": __version__,
                "torch": torch.__version__}
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        with torch.inference_mode():
            reference = backbone.forward(backbone.to_tensor(sample.numpy())).numpy()
        difference = float(np.abs(open_exported(staging).forward(sample).numpy() - reference).max())
        if not difference <= FEATURE_TOLERANCE:
            raise RuntimeError(f"exported {format} features differ from PyTorch by {difference:.3g} (> {FEATURE_TOLERANCE})")
        spec["max_feature_difference"] = difference
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            os.replace(staging, out_dir)
        except OSError:
            if not (out_dir / SPEC_FILE).is_file():
                raise
            shutil.rmtree(staging)  # another process wrote the same export first: keep theirs
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def check_export_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that is a file, or a folder that ``overwrite`` would have to empty of
    anything but an earlier export (it is deleted and replaced as a whole)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise OutputError(f"{out_dir} is a file, not an export folder; give a new folder name")
    if not overwrite:
        raise OutputExistsError(f"{out_dir} exists; refusing to overwrite it (pass --overwrite)")
    others = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in EXPORT_FILES or not entry.is_file())
    if others or not (out_dir / SPEC_FILE).is_file():
        held = f"it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}" if others else f"it has no {SPEC_FILE}"
        raise OutputError(f"{out_dir} is not an earlier export ({held}); --overwrite replaces an export folder "
                          "as a whole, so give a new or an export folder")


def export_model(detector, out_dir: str | os.PathLike, format: str = "onnx", overwrite: bool = False) -> Path:
    """Export the feature graph a fitted detector runs on (its backbone at its input size)."""
    check_exportable(detector)
    return export_backbone(detector.backbone, detector.size, out_dir, format, overwrite)
