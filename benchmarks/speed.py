"""End-to-end speed and memory of the default detector, as a user meets them.

    python benchmarks/speed.py [--train 200] [--test 300] [--size 256]

fit: `fit_from_folder`-equivalent on N BSData train images (backbone + coreset + threshold).
predict: the CLI's batch path (`predict_paths`: decode, backbone, kNN, maps at image size).
bare backbone: decode + resize + backbone forward on the same images, nothing else.
Peak RSS is the whole process's high-water mark. Writes benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from defectlens.backbones import get_backbone
from defectlens.engine.predict import predict_paths
from defectlens.models import DEFAULT_METHOD, create_detector

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets" / "bsdata" / "ball_screw"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--method", default=DEFAULT_METHOD)
    args = parser.parse_args()
    root = Path(args.data)
    train = sorted((root / "train" / "good").iterdir())[: args.train]
    test = sorted((root / "test").rglob("*.[jp][pn]g"))[: args.test]

    backbone = get_backbone("efficientnet-lite0", args.size)
    backbone.embed(train[:4])  # warm-up: weights in memory, kernels initialised
    started = time.perf_counter()
    detector = create_detector(args.method, size=args.size).fit(train)
    fit_s = time.perf_counter() - started

    started = time.perf_counter()
    with torch.inference_mode():
        for path in test:
            backbone.embed([path])
    bare_ms = (time.perf_counter() - started) / len(test) * 1000

    started = time.perf_counter()
    results = list(predict_paths(detector, test, progress=False))
    predict_ms = (time.perf_counter() - started) / len(test) * 1000
    assert all(r.error is None for r in results)

    rows = [
        ("fit", f"{len(train)} images", f"{fit_s:.1f} s", "≤ 20 s"),
        ("predict (CLI path, maps at 1130×460)", f"{len(test)} images", f"{predict_ms:.1f} ms/img", "≤ 25 ms/img"),
        ("bare backbone (decode + resize + forward)", f"{len(test)} images", f"{bare_ms:.1f} ms/img", "–"),
        ("predict / bare backbone", "", f"{predict_ms / bare_ms:.2f}×", "≤ 2×"),
        ("peak RSS (whole process)", "", f"{peak_rss_mb():.0f} MB", "≤ 1500 MB"),
    ]
    table = "\n".join(["| step | images | measured | target |", "|---|---|---|---|"] + [f"| {' | '.join(r)} |" for r in rows])
    text = (f"# Speed and memory: `{args.method}` at {args.size} px\n\n`python benchmarks/speed.py --train {args.train} "
            f"--test {args.test} --size {args.size}` on {platform.machine()}, {torch.get_num_threads()} threads, "
            f"{time.strftime('%Y-%m-%d')}; BSData images (1130×460 JPEG).\n\n{table}\n")
    print(text)
    (HERE / "results" / "speed.md").write_text(text)


if __name__ == "__main__":
    main()
