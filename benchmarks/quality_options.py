"""Detector options measured on the real sets: input geometry, PatchCore's bank size /
re-weighting / score reduction, score fusion (ensemble), and augmented few shots.

Each set is subsampled with a fixed seed (``--max-train`` normal images form the "full" pool,
``--max-test`` test images, half good, half defective) because a CPU shared by several jobs
embeds about one image per second. Backbone features are computed once per (set, geometry),
cached, and shared by every configuration, so the options differ only in what they change.
Runs: the full pool once, and ``--shots`` normal images × ``--seeds`` draws.

    python benchmarks/quality_options.py run ../shared/datasets/bsdata/ball_screw --name bsdata \\
        --part geometry --rows /tmp/qo/bsdata_geometry.json
    python benchmarks/quality_options.py report /tmp/qo/*.json --out benchmarks/results/quality_options

Parts: ``geometry`` (patchcore, padim, patchknn × square, keep_aspect, tiles), ``patchcore``
(bank size, re-weighting, top-k mean), ``ensemble`` (fusions against their members),
``augment`` (flips / rotations of the k shots, 1/2/4/8 shots).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defectlens.data.datasets import load_dataset
from defectlens.engine.benchmark import TestSet
from defectlens.metrics import evaluate
from defectlens.models import create_detector

EVAL_SIDE = 256
TILES = {"geometry": "tiles", "tile_size": 512, "tile_overlap": 0.25}
GEOMETRIES = {"square": {}, "keep_aspect": {"geometry": "keep_aspect"}, "tiles": TILES}
PARTS = {
    # PaDiM's per-position covariances cost minutes per fit on the shared CPU: left out.
    "geometry": [(method, geometry) for geometry in GEOMETRIES for method in (("patchcore", {}), ("patchknn", {}))],
    "patchcore": [(("patchcore", params), "square") for params in (
        {}, {"bank_size": 16384}, {"reweight_neighbours": 0}, {"top_k": 10},
        {"reweight_neighbours": 0, "top_k": 10})],
    # PaDiM left out: its 1024 per-position covariance inversions took minutes per fit here.
    "ensemble": [(method, "square") for method in (
        ("ensemble", {"members": ["patchcore", "patchknn"]}),
        ("ensemble", {"members": ["patchcore", "patchknn"], "member_params": {"patchcore": {"top_k": 10}}}))],
}


def subsample(dataset, max_train: int, max_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    train = [s for s in dataset.train if s.label == 0]
    train = [train[i] for i in sorted(rng.permutation(len(train))[:max_train])]
    test = []
    for label in (0, 1):
        group = [s for s in dataset.test if s.label == label]
        test += [group[i] for i in sorted(rng.permutation(len(group))[: max_test // 2])]
    return train, test


def embed(name: str, geometry: str, train, test, cache: Path):
    """(train features, test features, canvas_hw, embed ms/img), cached per set and geometry."""
    path = cache / f"{name}_{geometry}.pt"
    if path.exists():
        stored = torch.load(path)
        return stored["train"].float(), stored["test"].float(), stored["canvas"], stored["ms"]
    probe = create_detector("padim", **GEOMETRIES[geometry])
    train_features = probe.embed_images([s.path for s in train], fit=True, progress=f"{name} {geometry} train", total=len(train))
    started = time.perf_counter()
    test_features = probe.embed_images([s.path for s in test], progress=f"{name} {geometry} test", total=len(test))
    ms = (time.perf_counter() - started) / len(test) * 1000
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"train": train_features.half(), "test": test_features.half(), "canvas": probe.canvas_hw, "ms": ms}, path)
    return train_features, test_features, probe.canvas_hw, ms


def shot_runs(pool: int, shots: list[int], seeds: int) -> list[tuple[str, int, np.ndarray]]:
    runs = [("full", 0, np.arange(pool))]
    for count in shots:
        for seed in range(seeds):
            runs.append((str(count), seed, np.sort(np.random.default_rng(100 + seed).permutation(pool)[:count])))
    return runs


def run_part(args) -> None:
    dataset = load_dataset(args.data)
    train, test = subsample(dataset, args.max_train, args.max_test)
    labels = np.array([s.label for s in test])
    ground = TestSet(samples=test, labels=labels, defect_types=[s.defect_type for s in test])
    for sample in test:
        width, height = Image.open(sample.path).size
        ground.add_ground_truth(sample, (height, width), EVAL_SIDE)
    rows = []
    for (method, params), geometry in PARTS[args.part]:
        train_features, test_features, canvas, embed_ms = embed(args.name, geometry, train, test, Path(args.cache))
        for shots, seed, picks in shot_runs(len(train), args.shots, args.seeds):
            detector = create_detector(method, seed=seed, **GEOMETRIES[geometry], **params)
            started = time.perf_counter()
            detector.fit_from_features(train_features[picks], canvas_hw=canvas)
            fit_s = time.perf_counter() - started
            started = time.perf_counter()
            scores, patch_maps = detector.score_feature_batch(test_features)
            maps = [detector.upsample_map(m.numpy(), shape) for m, shape in zip(patch_maps, ground.eval_shapes)]
            score_ms = (time.perf_counter() - started) / len(test) * 1000
            metrics = evaluate(labels, scores, ground.defect_types, ground.masks, maps)["all"]
            flagged = scores > detector.threshold if detector.threshold is not None else None
            row = {"set": args.name, "part": args.part, "method": method, "geometry": geometry, "params": params,
                   "shots": shots, "seed": seed, "image_auroc": metrics["image_auroc"], "au_pro": metrics.get("au_pro"),
                   "fpr": None if flagged is None else float(flagged[labels == 0].mean()),
                   "tpr": None if flagged is None else float(flagged[labels == 1].mean()),
                   "fit_s": fit_s, "ms_per_image": embed_ms + score_ms, "n_train_pool": len(train), "n_test": len(test)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            # Written after every run: a part cut short still leaves what it measured.
            Path(args.rows).parent.mkdir(parents=True, exist_ok=True)
            Path(args.rows).write_text(json.dumps(rows, indent=1))


def config_name(row: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
    return f"{row['method']} {row['geometry']}" + (f" ({params})" if params else "")


def mean(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return statistics.fmean(values) if values else None


def fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def report(args) -> None:
    rows = [row for path in args.rows for row in json.loads(Path(path).read_text())]
    sets = sorted({row["set"] for row in rows})
    lines = ["# Detector options on the real sets (issue 11, items 2–6)", "",
             "Machine: 2 CPU cores shared by about seven agents at once: ms/img and fit times are upper bounds,",
             "useful only to compare options measured in the same part. Sets subsampled with a fixed seed",
             f"(pool of {rows[0]['n_train_pool']} normal images = \"full\", {rows[0]['n_test']} test images, half defective) so every",
             "option could be measured in the time; means over the seeds of the k-shot draws. Produced by",
             "`benchmarks/quality_options.py` (commands in its docstring).", ""]
    summary = {}
    for part in dict.fromkeys(row["part"] for row in rows):
        part_rows = [row for row in rows if row["part"] == part]
        configs = list(dict.fromkeys(config_name(row) for row in part_rows))
        shots = list(dict.fromkeys(row["shots"] for row in part_rows))
        lines += [f"## {part}", ""]
        header = "| option | shots | " + " | ".join(f"{s} AUROC | {s} AU-PRO | {s} TPR@thr | {s} FPR@thr" for s in sets) + \
                 " | mean AUROC | ms/img |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for config in configs:
            for shot in shots:
                cells, aurocs, times = [], [], []
                for name in sets:
                    chosen = [r for r in part_rows if config_name(r) == config and r["shots"] == shot and r["set"] == name]
                    block = {key: mean(r[key] for r in chosen) for key in ("image_auroc", "au_pro", "tpr", "fpr", "ms_per_image")}
                    summary.setdefault(part, {}).setdefault(config, {}).setdefault(shot, {})[name] = block
                    cells += [fmt(block["image_auroc"]), fmt(block["au_pro"]), fmt(block["tpr"]), fmt(block["fpr"])]
                    aurocs.append(block["image_auroc"])
                    times.append(block["ms_per_image"])
                # A mean over fewer sets than measured would compare unlike things: none.
                overall = mean(aurocs) if all(a is not None for a in aurocs) else None
                summary[part][config][shot]["mean_auroc"] = overall
                lines.append(f"| {config} | {shot} | " + " | ".join(cells) + f" | **{fmt(overall)}** | {mean(times) or 0:.0f} |")
        lines.append("")
        if len(sets) == 2:
            lines += leave_one_out(summary[part], sets, shots)
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print("\n".join(lines))


def leave_one_out(part: dict, sets: list[str], shots: list[str]) -> list[str]:
    """For each shot count: the option best on one set, reported on the other."""
    lines = ["Leave-one-set-out: the option with the best image AUROC on one set, reported on the other.", "",
             "| shots | chosen on | option | AUROC there | AUROC on the left-out set |", "|---|---|---|---|---|"]
    for shot in shots:
        for chosen_on, left_out in (sets, sets[::-1]):
            ranked = [(blocks[shot][chosen_on]["image_auroc"], name) for name, blocks in part.items()
                      if shot in blocks and blocks[shot]["mean_auroc"] is not None]
            if not ranked:
                continue
            best = max(ranked)[1]
            lines.append(f"| {shot} | {chosen_on} | {best} | {fmt(part[best][shot][chosen_on]['image_auroc'])} | "
                         f"{left_out}: {fmt(part[best][shot][left_out]['image_auroc'])} |")
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure one part on one set")
    run.add_argument("data")
    run.add_argument("--name", required=True)
    run.add_argument("--part", choices=sorted(PARTS) + ["augment"], required=True)
    run.add_argument("--rows", required=True, help="JSON file for the measured rows")
    run.add_argument("--cache", default="/tmp/quality_options_cache", help="backbone features, per set and geometry")
    run.add_argument("--max-train", type=int, default=24)
    run.add_argument("--max-test", type=int, default=48)
    run.add_argument("--shots", type=lambda text: [int(t) for t in text.split(",")], default=[4])
    run.add_argument("--seeds", type=int, default=2)
    rep = commands.add_parser("report", help="tables from measured rows")
    rep.add_argument("rows", nargs="+")
    rep.add_argument("--out", default="benchmarks/results/quality_options")
    args = parser.parse_args(argv)
    run_part(args) if args.command == "run" else report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
