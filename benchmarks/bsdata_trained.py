"""Detectors trained on synthetic anomalies (DRAEM, DeSTSeg) on the real BSData ball-screw set.

    python benchmarks/bsdata_trained.py [--methods draem,destseg] [--variants perlin,anogen] [--seeds 0,1,2]

Each method is fitted on all train/good images, per seed and variant: ``perlin`` (Perlin anomalies
only), ``anogen`` (``--anomalies`` real pitting images, picked from the test set with the seed,
turned into copy-paste transplant anomalies labelled by their box (AnoGen's labelling, not its diffusion) and trained with the weak box
loss, next to the Perlin ones; 50/50) and ``anogen-mask`` (the same, labelled by the transplanted
defect's exact mask: an ablation of the box loss). Each run goes through the engine's benchmark
(``--param anomalies=K``): a run that learns from real test images is evaluated without them.

Every finished run is written to benchmarks/results/bsdata_trained.json at once and skipped when
the script is started again, so an interrupted sweep resumes; the markdown table is rewritten
from the JSON after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from defectlens.data.datasets import load_dataset
from defectlens.engine.benchmark import run_benchmark

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets" / "bsdata" / "ball_screw"
CORE_TABLE = HERE / "results" / "bsdata_quality.md"
CORE_METHODS = ("patchcore", "padim", "spade", "patchknn")
METRICS = ("image_auroc", "image_aupr", "f1_max", "pixel_auroc", "au_pro")


VARIANTS = {
    # name: (use the real anomalies, how the generated ones are labelled)
    "perlin": (False, "box"),
    "anogen": (True, "box"),
    "anogen-mask": (True, "mask"),
}


def describe(variant: str, anomalies: int) -> str:
    return {"perlin": "Perlin only", "anogen": f"Perlin + transplants of {anomalies} real (box loss)",
            "anogen-mask": f"Perlin + transplants of {anomalies} real (exact masks; ablation)"}[variant]


def run(method: str, dataset, variant: str, anomalies: int, seed: int, size: int, steps: int | None) -> dict:
    """One full-shot run through the engine's benchmark: the anogen variants learn from
    ``anomalies`` real test images (picked with ``seed``), which that run evaluates without."""
    use_real, labels = VARIANTS[variant]
    params = {"size": size, "steps": steps, "anomalies": anomalies if use_real else 0, "anogen_labels": labels}
    result = run_benchmark(dataset.root, method=method, shots=["full"], seeds=[seed], params=params, dataset=dataset)
    (run_,) = result.runs
    metrics = run_["metrics"]["all"]
    return {
        "method": method, "variant": variant, "seed": seed, "held_out_of_test": run_["from_test"],
        "n_train": result.n_train, "n_test": metrics["n_normal"] + metrics["n_anomalous"], "params": result.params,
        "fit_seconds": run_["fit_seconds"], "ms_per_image": run_["score_ms_per_image"], "threshold": run_["threshold"],
        "fpr_at_threshold": run_["fpr_at_threshold"], "tpr_at_threshold": run_["tpr_at_threshold"],
        **{k: metrics[k] for k in METRICS}, "threads": torch.get_num_threads(),
    }


def core_rows() -> list[str]:
    """The full-shot rows of the core detectors, quoted from bsdata_quality.md."""
    text = CORE_TABLE.read_text()
    rows = []
    for method in CORE_METHODS:
        section = text.split(f"### {method}\n", 1)[1]
        line = next(row for row in section.splitlines() if row.startswith("| full"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        # columns: shots, seeds, image_auroc, image_aupr, f1_max, pixel_auroc, au_pro, fpr, tpr, fit_seconds, score_ms
        rows.append(f"| {method} (quoted) | normal images only | – | {cells[2]} | {cells[3]} | {cells[5]} | {cells[6]} | "
                    f"{cells[7]} / {cells[8]} | {cells[9]} s + features | {cells[10]} + features |")
    return rows


def _cell(values: list[float], digits: int = 3) -> str:
    mean = float(np.mean(values))
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {float(np.std(values)):.{digits}f}"


def write_markdown(results: list[dict], out: Path, anomalies: int) -> None:
    header = ("| method | training anomalies | seeds | image AUROC | image AUPR | pixel AUROC | AU-PRO | "
              "FPR / TPR at threshold | train time | ms/image |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(results, key=lambda r: (r["method"], list(VARIANTS).index(r["variant"]), r["seed"]))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in order:
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    for (method, variant), group in groups.items():
        metric = {k: _cell([r[k] for r in group]) for k in ("image_auroc", "image_aupr", "pixel_auroc", "au_pro")}
        minutes = _cell([r["fit_seconds"] / 60 for r in group], 1)
        lines.append(f"| {method} | {describe(variant, anomalies)} | {','.join(str(r['seed']) for r in group)} | "
                     f"{metric['image_auroc']} | {metric['image_aupr']} | {metric['pixel_auroc']} | {metric['au_pro']} | "
                     f"{_cell([r['fpr_at_threshold'] for r in group])} / {_cell([r['tpr_at_threshold'] for r in group])} | "
                     f"{minutes} min | {_cell([r['ms_per_image'] for r in group], 0)} |")
    lines += core_rows()
    per_run = ["| method | variant | seed | image AUROC | pixel AUROC | AU-PRO | train min | real anomalies (held out of the test set) |",
               "|---|---|---|---|---|---|---|---|"]
    for r in sorted(order, key=lambda r: (r["method"], r["seed"], list(VARIANTS).index(r["variant"]))):
        per_run.append(f"| {r['method']} | {r['variant']} | {r['seed']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
                       f"{r['au_pro']:.3f} | {r['fit_seconds'] / 60:.1f} | {', '.join(Path(p).name for p in r['held_out_of_test'])} |")
    first = results[0] if results else {"threads": "?", "n_train": "?", "n_test": "?"}
    text = (f"# BSData ball_screw: detectors trained on synthetic anomalies\n\n"
            "Each row: `python benchmarks/bsdata_trained.py --methods METHOD --variants VARIANT --seeds SEEDS` "
            f"(variants {', '.join(VARIANTS)}; the script skips runs already in bsdata_trained.json), with "
            f"`DEFECTLENS_THREADS={first['threads']}`, on a {platform.machine()} machine with "
            f"{len(os.sched_getaffinity(0))} cores shared with other jobs, {time.strftime('%Y-%m-%d')}.\n\n"
            f"Trained on all {first['n_train']} train/good images (a fifth held out for the threshold). Each seed picks "
            f"{anomalies} real pitting images from the test set as transplant sources and leaves them out of the test set of "
            f"every variant of that seed ({first['n_test']} test images), so the variants are scored on the same images. "
            "Image AUROC/AUPR on image scores; pixel AUROC and AU-PRO (FPR ≤ 0.3, normalised) on maps at the image's "
            "aspect ratio, longer side 512 px. FPR / TPR: share of good / pitting test images above the threshold set from "
            "held-out good images (target false-alarm rate 1 %). Train time and ms/image are wall-clock end to end (decode, "
            "resize, networks, maps at 1130×460) on a machine shared with other jobs: noisy, and slower than an idle "
            "machine. Mean ± std over seeds.\n\n"
            "The core detectors' rows are quoted from bsdata_quality.md (full-shot, one run, all 609 test images; their "
            "fit and ms/image exclude the backbone features).\n\n"
            + "\n".join(lines) + "\n\nPer run:\n\n" + "\n".join(per_run) + "\n")
    out.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--methods", default="draem,destseg")
    parser.add_argument("--variants", default="perlin,anogen", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--anomalies", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the method's own)")
    parser.add_argument("--out", default=str(HERE / "results" / "bsdata_trained"))
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    json_path, md_path = Path(args.out + ".json"), Path(args.out + ".md")
    results = json.loads(json_path.read_text()) if json_path.is_file() else []
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for variant in args.variants.split(","):
                if any(r["method"] == method and r["variant"] == variant and r["seed"] == seed for r in results):
                    continue
                print(f"== {method}: {variant}, seed {seed}", flush=True)
                results.append(run(method, dataset, variant, args.anomalies, seed, args.size, args.steps))
                print(json.dumps({k: v for k, v in results[-1].items() if k != "params"}), flush=True)
                json_path.write_text(json.dumps(results, indent=1))
                write_markdown(results, md_path, args.anomalies)
    write_markdown(results, md_path, args.anomalies)


if __name__ == "__main__":
    main()
