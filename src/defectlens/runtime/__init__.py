"""Exported runtimes: the backbone feature graph on ONNX Runtime or OpenVINO, checked against
PyTorch, behind the same backbone interface (scoring stays in faiss and torch)."""

from .backbones import ExportedBackbone, OnnxRuntimeBackbone, OpenVinoBackbone, open_exported
from .export import EXPORTABLE_METHODS, FEATURE_TOLERANCE, NotExportableError, check_exportable, export_backbone, export_model
from .load import RUNTIMES, cached_export, installed, load_runtime, runtime_of
from .spec import FORMATS, BrokenExportError, read_spec

__all__ = ["BrokenExportError", "EXPORTABLE_METHODS", "FEATURE_TOLERANCE", "FORMATS", "RUNTIMES", "ExportedBackbone", "NotExportableError",
           "OnnxRuntimeBackbone", "OpenVinoBackbone", "check_exportable", "export_backbone", "export_model", "installed",
           "load_runtime", "open_exported", "read_spec", "runtime_of", "cached_export"]
