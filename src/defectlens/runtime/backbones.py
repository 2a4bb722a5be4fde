"""Backbones that run an exported feature graph with ONNX Runtime or OpenVINO.

They keep the interface of the PyTorch backbone (``embed``, ``input_hw``, ``levels``,
``feature_dim``), so a detector scores the same way on them; only the forward pass changes.
Their ``forward`` takes resized uint8 (N, H, W, 3) batches: normalisation is in the graph.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from ..backbones.base import PatchBackbone, configure_threads
from .spec import GRAPH_FILES, read_spec


class ExportedBackbone(PatchBackbone):
    runtime = "exported"
    # Larger batches than PyTorch's, but not 8: at 256 px a batch of 8 holds 103 MB of ONNX
    # Runtime's arena against 52 for 4, at the same speed (4.1 against 3.8-3.9 ms/img for the
    # forward alone; the default's 300-image predict 6.60 against 6.80 s, peak 673 against 743
    # MiB, OpenVINO 712 against 773; farm-bench A/B, 5 pairs, 2026-12-03).
    batch_size = 4

    def __init__(self, export_dir: str | os.PathLike, spec: dict, hold_memory: bool = True):
        """``hold_memory``: keep the memory of a batch's intermediate tensors for the next batch
        (ONNX Runtime's arena), as a predict that runs batch after batch wants; a fit embeds its
        images once and then needs that memory for the memory banks (see OnnxRuntimeBackbone)."""
        super().__init__(tuple(spec["input_hw"]))
        self.hold_memory = hold_memory
        self.export_dir = Path(export_dir)
        self.name = spec["backbone"]
        self.stride = spec["stride"]
        self.mean, self.std = tuple(spec["mean"]), tuple(spec["std"])
        self._levels = tuple(tuple(level) for level in spec["levels"])
        self._dim = spec["feature_dim"]
        self.threads = configure_threads()

    @property
    def feature_dim(self) -> int:
        return self._dim

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        return self._levels

    def to_tensor(self, resized: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(resized)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(np.ascontiguousarray(batch.numpy(), dtype=np.uint8)))

    def _run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxRuntimeBackbone(ExportedBackbone):
    runtime = "onnx"

    def __init__(self, export_dir: str | os.PathLike, spec: dict, hold_memory: bool = True):
        super().__init__(export_dir, spec, hold_memory)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Memory-pattern planning pre-allocates one block for all of a batch's intermediate
        # tensors: 8 images at 256 px, +175 MB of peak memory against +103 MB without it, and no
        # faster (10.2-11.1 against 8.5-8.9 ms/img, two alternating runs each; the arena stays).
        options.enable_mem_pattern = False
        # Without the arena each batch's tensors go back to malloc after the run. The default's fit
        # of 200 images at 256 px (--runtime auto): peak 929 -> 758 MiB, wall 1.03x (farm-bench
        # A/B, 5 pairs, 2026-12-03); its 300-image predict: peak 719 -> 749 MiB, wall 0.98x, so
        # predict keeps it.
        options.enable_cpu_mem_arena = self.hold_memory
        # Its threads wait asleep, not spinning, between runs: the search and PaDiM that follow each
        # batch need the same two cores (a 300-image predict CSV 7.61 -> 7.03 s, cpu 12.0 -> 10.4 s).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(self.export_dir / GRAPH_FILES["onnx"]), options,
                                                    providers=["CPUExecutionProvider"])

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": images})[0]


class OpenVinoBackbone(ExportedBackbone):
    runtime = "openvino"

    def __init__(self, export_dir: str | os.PathLike, spec: dict, hold_memory: bool = True):
        super().__init__(export_dir, spec, hold_memory)  # OpenVINO sizes its own buffers per request
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.export_dir / GRAPH_FILES["openvino"]))
        # f32 inference: OpenVINO would use bf16 on CPUs that have it, which breaks parity with PyTorch.
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
        # One infer request per thread: a request is not safe to share, and the service predicts
        # from several threads (serve --workers) on one detector.
        self._requests = threading.local()

    def _run(self, images: np.ndarray) -> np.ndarray:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        # The request reuses its output buffer: copy before the next batch overwrites it.
        return np.array(request.infer({0: images})[self.compiled.output(0)], copy=True)


RUNTIME_BACKBONES = {"onnx": OnnxRuntimeBackbone, "openvino": OpenVinoBackbone}


def open_exported(export_dir: str | os.PathLike, hold_memory: bool = True) -> ExportedBackbone:
    """The runtime backbone for an export folder, in the runtime of its format (``hold_memory``:
    see ``ExportedBackbone``)."""
    spec = read_spec(export_dir)
    return RUNTIME_BACKBONES[spec["format"]](export_dir, spec, hold_memory)
