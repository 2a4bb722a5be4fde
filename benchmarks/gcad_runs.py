"""GCAD measured: k-shot logical vs structural AUROC on generated LOCO sets, and BSData.

    python benchmarks/gcad_runs.py [--loco-seeds 0,1] [--shots 1,2,4,8,full] [--seeds 3]
                                   [--bsdata-shots full] [--work /tmp/gcad-bench]

LOCO: ``defectlens generate WORK/loco-S --kind loco --seed S`` for each generator seed S
(category "assembly": 40 train, 20 good, 40 logical and 24 structural test images), then
``run_benchmark(..., method="gcad")`` through the generic path (fit on the picked files, predict
the test files in the detector's chunks). BSData: the real ball-screw set (structural only).

Every finished (dataset, shots) block is written to benchmarks/results/gcad.json at once and
skipped when the script is started again, so an interrupted sweep resumes; gcad.md is rewritten
from the JSON after each block. Train times are wall-clock on this machine, which is shared with
other jobs: each block records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from defectlens.data.generator import generate
from defectlens.engine.benchmark import parse_shots, run_benchmark
from defectlens.models.gcad.model import (
    AUGMENT_TO,
    GCAD,
    HELD_OUT_MAX,
    MAX_STEPS,
    MIN_STEPS,
    STEPS_PER_IMAGE,
)
from defectlens.report.benchmark import jsonable

HERE = Path(__file__).resolve().parent
BSDATA = HERE.parents[1] / "shared" / "datasets" / "bsdata" / "ball_screw"
OUT = HERE / "results" / "gcad"


def _mean_std(values) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _minutes(values) -> str:
    return f"{np.mean(values) / 60:.1f}" + (f" ± {np.std(values) / 60:.1f}" if len(values) > 1 else "")


def _auroc(runs: list[dict], group: str) -> str:
    return _mean_std([r["metrics"].get(group, {}).get("image_auroc") for r in runs])


def _block_row(name: str, block: dict) -> str:
    runs = block["runs"]
    shots = "full" if block["full"] else str(block["shots"])
    return (f"| {name} | {shots} ({runs[0]['shots']} img) | {len(runs)} | {_auroc(runs, 'logical')} | "
            f"{_auroc(runs, 'structural')} | {_auroc(runs, 'all')} | {_mean_std([r['metrics']['all'].get('pixel_auroc') for r in runs])} | "
            f"{_mean_std([r['fpr_at_threshold'] for r in runs])} / {_mean_std([r['tpr_at_threshold'] for r in runs])} | "
            f"{_minutes([r['fit_seconds'] for r in runs])} | "
            f"{np.mean([r['score_ms_per_image'] for r in runs]):.0f} | {block['load'][0]:.1f} → {block['load'][1]:.1f} |")


def write_markdown(results: dict) -> None:
    commands = "; ".join(f"`{c}`" for c in dict.fromkeys(block["command"] for block in results.values()))
    defaults = GCAD().get_params()
    header = (
        "# GCAD: logical vs structural, k-shot\n\n"
        f"{commands} on a {platform.machine()} machine, {len(os.sched_getaffinity(0))} cores shared with other "
        f"engineers' jobs (load average before → after each block in the last column), torch threads "
        f"{torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}.\n\n"
        f"Default parameters (`--method gcad`): {defaults['size']} px input, teacher = EfficientNet-Lite0 stride-8 "
        f"stage (40 channels) reduced to {defaults['dims']} PCA components; a fifth of the normal images (at least 1, "
        f"at most {HELD_OUT_MAX}) held out for map normalisation and the threshold; {STEPS_PER_IMAGE} training steps "
        f"per remaining image, within {MIN_STEPS}–{MAX_STEPS}; altered copies (pose, lighting) up to "
        f"{AUGMENT_TO} training images. Image AUROC of "
        "logical and of structural anomalies (each against all good test images) and of all test images; pixel "
        "AUROC on maps at the image's aspect ratio (longer side 512 px). FPR / TPR: share of good / anomalous "
        "test images above the threshold set from held-out good images (target 1 %; no threshold with one "
        "image). Train time: wall-clock `fit` (reading, teacher features, training, calibration); ms/image: "
        "`predict` end to end. Mean ± std over seeds (shot picks and initialisation).\n\n"
        "| data | shots | seeds | logical AUROC | structural AUROC | all AUROC | pixel AUROC | FPR / TPR | "
        "train min | ms/image | load |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    order = sorted(results.values(), key=lambda block: (block["data"], block["full"], block["shots"]))
    rows = [_block_row(block["data"], block) for block in order]
    OUT.with_suffix(".md").write_text(header + "\n".join(rows) + "\n")


def load_results() -> dict:
    path = OUT.with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}


def run_block(key: str, data: Path, name: str, shots, seeds: int, command: str) -> None:
    """One (dataset, shots) block: every seed's run, added to the JSON and the table."""
    if key in load_results():
        print(f"{key}: done earlier, skipped")
        return
    load_before = os.getloadavg()[0]
    result = run_benchmark(data, method="gcad", shots=[shots], seeds=seeds)
    block = {"data": name, "shots": result.runs[0]["shots"], "full": shots == "full", "runs": result.runs,
             "n_train": result.n_train, "n_test": result.n_test, "load": [load_before, os.getloadavg()[0]],
             "command": command}
    # Re-read before writing: two sweeps (say one per LOCO set) may share the file.
    results = load_results() | {key: block}
    partial = OUT.with_suffix(".json.partial")
    partial.write_text(json.dumps(jsonable(results), indent=1, allow_nan=False))
    os.replace(partial, OUT.with_suffix(".json"))
    write_markdown(results)
    print(_block_row(name, block), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loco-seeds", default="0,1", help="generator seeds of the LOCO sets")
    parser.add_argument("--shots", default="1,2,4,8,full")
    parser.add_argument("--seeds", type=int, default=3, help="shot-pick / initialisation seeds per k")
    parser.add_argument("--bsdata", default=str(BSDATA))
    parser.add_argument("--bsdata-shots", default="full", help="shot counts on BSData ('' to skip)")
    parser.add_argument("--work", default="/tmp/gcad-bench", help="where the LOCO sets are generated")
    args = parser.parse_args()
    command = ("python benchmarks/gcad_runs.py " + f"--loco-seeds {args.loco_seeds} --shots {args.shots} "
               f"--seeds {args.seeds} --bsdata-shots '{args.bsdata_shots}'")
    for loco_seed in [int(s) for s in args.loco_seeds.split(",") if s]:
        folder = Path(args.work) / f"loco-{loco_seed}" / "assembly"
        if not folder.is_dir():
            generate(folder.parent, kind="loco", seed=loco_seed)
        for shots in parse_shots(args.shots):
            run_block(f"loco-{loco_seed}/{shots}", folder, f"LOCO gen. seed {loco_seed}", shots, args.seeds, command)
    if args.bsdata_shots and Path(args.bsdata).is_dir():
        for shots in parse_shots(args.bsdata_shots):
            run_block(f"bsdata/{shots}", Path(args.bsdata), "BSData ball_screw", shots, args.seeds, command)


if __name__ == "__main__":
    main()
