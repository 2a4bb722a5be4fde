"""Backbone forward and end-to-end predict per runtime (PyTorch, ONNX Runtime, OpenVINO).

    python benchmarks/runtime_speed.py [--images 60] [--sizes 256,512] [--repeats 3]

bare forward: the backbone on pre-resized uint8 batches of 8 (no decoding), ms per image.
predict: `predict_paths` of a PatchCore model fitted on 20 BSData train images (decode, resize,
  forward, faiss kNN, maps at image size), ms per image.
kNN in the graph: PatchCore's nearest-bank-row distance as an ONNX matmul + min against the
  4096-row bank, vs faiss on the same features.
Medians of ``--repeats``. Writes benchmarks/results/runtime_speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectlens.backbones import get_backbone
from defectlens.data.io import read_image
from defectlens.engine.predict import predict_paths
from defectlens.models import create_detector
from defectlens.runtime import export_backbone, installed, load_runtime, open_exported

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets" / "bsdata" / "ball_screw"


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def knn_graph_vs_faiss(detector, features: torch.Tensor, folder: Path, repeats: int) -> tuple[float, float, float]:
    """ms per image of the nearest-bank distance: ONNX graph (matmul + min) vs faiss flat."""
    import onnxruntime

    bank = detector.bank

    class Nearest(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bank", bank)
            self.register_buffer("norms", (bank * bank).sum(1))

        def forward(self, patches):
            squared = (patches * patches).sum(1, keepdim=True) - 2.0 * patches @ self.bank.T + self.norms
            return squared.amin(dim=1).clamp_min(0).sqrt()

    patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).contiguous()
    path = folder / "nearest.onnx"
    torch.onnx.export(Nearest(), (patches[:8],), str(path), input_names=["patches"], output_names=["distance"],
                      dynamic_axes={"patches": {0: "n"}, "distance": {0: "n"}}, opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph_s = median_time(lambda: session.run(None, {"patches": patches.numpy()}), repeats)
    faiss_s = median_time(lambda: detector.score_features(features), repeats)
    difference = float(np.abs(session.run(None, {"patches": patches.numpy()})[0]
                              - detector.score_features(features).flatten().numpy()).max())
    return graph_s / len(features) * 1000, faiss_s / len(features) * 1000, difference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "runtime_speed.md"))
    args = parser.parse_args()
    root = Path(args.data)
    train = sorted((root / "train" / "good").iterdir())[:20]
    test = sorted((root / "test").rglob("*.[jp][pn]g"))[: args.images]
    runtimes = ["torch"] + [name for name in ("onnx", "openvino") if installed(name)]
    lines = [f"# Runtime speed ({len(test)} BSData test images, PatchCore bank 4096)", "",
             f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores given, "
             f"torch threads {torch.get_num_threads()}. Shared with other agents (load average {os.getloadavg()[0]:.0f} "
             f"at the start): times are upper bounds; medians of {args.repeats} runs. The ratios between runtimes in "
             f"one run are the figures to read.", "",
             "| size | runtime | bare forward (ms/img) | predict end to end (ms/img) | predict / bare |", "|---|---|---|---|---|"]
    knn_lines = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in map(int, args.sizes.split(",")):
            torch_backbone = get_backbone("efficientnet-lite0", size)
            resized = np.stack([torch_backbone.resize(read_image(path)) for path in test])
            detector = create_detector("patchcore", size=size).fit(train)
            for runtime in runtimes:
                if runtime == "torch":
                    backbone = torch_backbone
                    forward = lambda batch: torch_backbone.forward(torch_backbone.to_tensor(batch))  # noqa: E731
                else:
                    backbone = open_exported(export_backbone("efficientnet-lite0", size, Path(scratch) / f"{runtime}-{size}", runtime))
                    forward = lambda batch, backbone=backbone: backbone.forward(torch.from_numpy(batch))  # noqa: E731

                def bare(forward=forward, batch=8):
                    with torch.inference_mode():
                        for start in range(0, len(resized), batch):
                            forward(resized[start : start + batch])

                bare_ms = median_time(bare, args.repeats) / len(test) * 1000
                detector.backbone_network = backbone
                predict_ms = median_time(lambda: list(predict_paths(detector, test, progress=False)), args.repeats) / len(test) * 1000
                lines.append(f"| {size} | {runtime} | {bare_ms:.1f} | {predict_ms:.1f} | {predict_ms / bare_ms:.2f} |")
                print(lines[-1], flush=True)
            if installed("onnx"):
                features = torch_backbone.embed(test[:16])
                graph_ms, faiss_ms, difference = knn_graph_vs_faiss(detector, features, Path(scratch), args.repeats)
                knn_lines.append(f"| {size} | {graph_ms:.1f} | {faiss_ms:.1f} | {difference:.1e} |")
                print(knn_lines[-1], flush=True)
    lines += ["", "## Nearest bank row: kNN in the ONNX graph vs faiss (16 images, bank 4096)", "",
              "| size | ONNX matmul + min (ms/img) | faiss flat (ms/img) | largest distance difference |", "|---|---|---|---|", *knn_lines]
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
