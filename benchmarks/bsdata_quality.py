"""Quality on the real BSData ball-screw set: every detector, 1/2/4/8 shots × 5 seeds and full-shot.

    python benchmarks/bsdata_quality.py [--methods patchcore,padim,spade,patchknn] [--seeds 5]

Writes benchmarks/results/bsdata_quality.md (the table) and bsdata_quality.json (every run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from defectlens.engine.benchmark import format_table, markdown_table, run_benchmark
from defectlens.report.benchmark import TABLE_COLUMNS, jsonable

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets" / "bsdata" / "ball_screw"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--methods", default="patchcore,padim,spade,patchknn")
    parser.add_argument("--shots", default="1,2,4,8,full")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", default=str(HERE / "results" / "bsdata_quality"))
    args = parser.parse_args()
    from defectlens.engine.benchmark import parse_shots

    sections, results = [], {}
    for method in args.methods.split(","):
        started = time.perf_counter()
        result = run_benchmark(args.data, method=method, shots=parse_shots(args.shots), seeds=args.seeds,
                               params={"size": args.size})
        results[method] = result.to_json()
        table = format_table(result.summary, result.n_train)
        sections.append(f"### {method}\n\n{markdown_table(table, TABLE_COLUMNS)}\n\n"
                        f"({time.perf_counter() - started:.0f} s for the whole sweep)\n")
        print(sections[-1], flush=True)
    header = (f"# BSData ball_screw (real pitting defects): k-shot quality\n\n"
              f"`python benchmarks/bsdata_quality.py --methods {args.methods} --shots {args.shots} --seeds {args.seeds} --size {args.size}`"
              f" on {platform.node() and 'a'} {platform.machine()} machine, {len(__import__('os').sched_getaffinity(0))} cores, "
              f"{time.strftime('%Y-%m-%d')}.\n\n"
              "Test set: 284 good + 325 pitting images. Image AUROC/AUPR/F1-max on image scores; pixel AUROC and AU-PRO "
              "(FPR ≤ 0.3, normalised) on maps at the image's aspect ratio, longer side 512 px. `fpr_at_threshold` / "
              "`tpr_at_threshold`: share of good / defective test images flagged by the threshold the model set from good "
              "training images alone (target false-alarm rate 1 %). `fit_seconds` and `score_ms_per_image` exclude the backbone "
              "(features are computed once per sweep); see speed.md for end-to-end timings. Mean ± std over seeds.\n\n")
    Path(args.out + ".md").write_text(header + "\n".join(sections))
    Path(args.out + ".json").write_text(json.dumps(jsonable(results), indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
