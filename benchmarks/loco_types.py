"""Which logical and structural anomaly types composition finds at few shots, and by which of its
calibrated scores: image AUROC per defect type on generated LOCO sets.

    python benchmarks/loco_types.py [--categories assembly,photo_assembly] [--loco-seeds 0,1,2]
        [--seeds 5] [--shots 4] [--config LABEL=composition:KEY=VALUE,...] [--work DIR] [--out NAME]

Sets: ``defectlens generate --kind loco`` per category and generator seed, trays at 256 px, 16
train, 16 good and 4 of each anomaly type per test set (the sets of composition_fusion.md and
loco_fewshot_structural.md; written when missing). A test image's type is the defect of its
first mask (a misplaced part's, not the missing part its compartment then has), named by the
mask's pixel value in defects_config.json. For each configuration and shot draw, composition is
fitted on ``--shots`` good images; each test image gets the detector's score and the nine
calibrated scores (``score_parts``). Every score's AUROC against the good test images, per type
and per group, mean over all runs (generator sets × draws). Runs are kept in NAME.json and
skipped when the script runs again; NAME.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from defectlens.data.io import read_image
from defectlens.engine.fit import training_set
from defectlens.models import LearningType, create_detector
from defectlens.models.composition.model import SCORES

from composition_fusion import fewshot_loco_set, loco_set_arguments
from real_suite import parse_config

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = 'defaults=composition:size=256'


def defect_names(dataset) -> list[str]:
    """Per test image: "good", or the defect its first mask marks."""
    by_value = {int(entry["pixel_value"]): entry["defect_name"] for entry in dataset.defects_config}
    names = []
    for sample in dataset.test:
        if sample.label == 0:
            names.append("good")
            continue
        mask = cv2.imread(str(sample.mask_paths[0]), cv2.IMREAD_GRAYSCALE)
        values = np.unique(mask[mask > 0])
        if len(values) != 1:
            raise ValueError(f"{sample.mask_paths[0]}: expected one defect value, found {values.tolist()}")
        names.append(by_value[int(values[0])])
    return names


def collect(args, configs: list[tuple[str, str, dict]], store: list[dict], save) -> None:
    done = {(r["config"], r["category"], r["set"], r["seed"]) for r in store}
    for category in args.categories.split(","):
        for loco_seed in (int(s) for s in args.loco_seeds.split(",")):
            dataset = fewshot_loco_set(Path(args.work), category, loco_seed, args.photos)
            names = defect_names(dataset)
            logical = [bool(s.logical) for s in dataset.test]
            images = [read_image(sample.path) for sample in dataset.test]
            for label, method, params in configs:
                for seed in range(args.seeds):
                    if (label, category, loco_seed, seed) in done:
                        continue
                    started = time.perf_counter()
                    shots = training_set(dataset, LearningType.NORMAL, args.shots, seed).images
                    detector = create_detector(method, **{"seed": seed, **params}).fit(shots)
                    compositions, _ = detector.compose(images, detector.backbone_network.embed(images))
                    seven = [detector.score_parts(parts)[0] for parts in compositions]
                    store.append({"config": label, "params": params, "category": category, "set": loco_seed,
                                  "seed": seed, "types": names, "logical": logical,
                                  "score": np.asarray(detector.predict(images, maps=False).scores).tolist(),
                                  "seven": [{s: float(c[s]) for s in SCORES} for c in seven]})
                    save()
                    print(f"{label} {category}-{loco_seed} draw {seed}: {time.perf_counter() - started:.0f} s", flush=True)


def auroc(names: np.ndarray, scores: np.ndarray, chosen: np.ndarray) -> float:
    keep = (names == "good") | chosen
    return float(roc_auc_score(chosen[keep], scores[keep]))


def tables(store: list[dict]) -> str:
    lines = []
    for label in sorted({r["config"] for r in store}):
        for category in sorted({r["category"] for r in store if r["config"] == label}):
            runs = [r for r in store if r["config"] == label and r["category"] == category]
            logical_types = dict.fromkeys(t for r in runs for t, flag in zip(r["types"], r["logical"]) if flag)
            structural_types = dict.fromkeys(t for r in runs for t, flag in zip(r["types"], r["logical"])
                                             if not flag and t != "good")
            types = [*logical_types, *structural_types]
            lines += [f"## {label} on {category}: {len(runs)} runs ({len({r['set'] for r in runs})} sets × draws), "
                      f"parameters {json.dumps(runs[0]['params'])}", "",
                      "| score | logical | structural | " + " | ".join(types) + " |",
                      "|---|---|---|" + "---|" * len(types)]
            for score in ("detector", *SCORES):
                per_run = []  # (names, scores) of each run: every generator set has its own test images
                for r in runs:
                    values = r["score"] if score == "detector" else [c[score] for c in r["seven"]]
                    per_run.append((np.array(r["types"]), np.array(r["logical"]), np.array(values)))
                cells = []
                for group in ("logical", "structural"):
                    aurocs = [auroc(names, values, flags if group == "logical" else ~flags & (names != "good"))
                              for names, flags, values in per_run]
                    cells.append(f"{np.mean(aurocs):.3f} ± {np.std(aurocs, ddof=1):.3f}")
                cells += [f"{np.mean([auroc(names, values, names == t) for names, _, values in per_run]):.2f}" for t in types]
                lines.append(f"| {score} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    loco_set_arguments(parser)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--config", action="append", default=[], metavar="LABEL=composition:KEY=VALUE,...",
                        help=f"a composition configuration (repeatable; default {DEFAULT_CONFIG})")
    parser.add_argument("--out", default=str(HERE / "results" / "loco_types"))
    args = parser.parse_args()
    configs = []
    for text in args.config or [DEFAULT_CONFIG]:
        label, _, spec = text.partition("=")
        method, params = parse_config(spec)
        if method != "composition":
            parser.error(f"--config {text}: the calibrated scores are composition's")
        configs.append((label, method, params))
    out = Path(args.out)
    store = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else []

    def save() -> None:
        out.with_suffix(".json").write_text(json.dumps(store))

    collect(args, configs, store, save)
    default_out = parser.get_default("out")
    text = ("# Composition per anomaly type: the detector's score and each of its calibrated scores\n\n"
            f"`python benchmarks/loco_types.py --categories {args.categories} --loco-seeds {args.loco_seeds} "
            f"--seeds {args.seeds} --shots {args.shots}" + "".join(f" --config '{c}'" for c in args.config)
            + ("" if args.out == default_out else f" --out {os.path.relpath(Path(args.out).resolve(), HERE.parent)}")
            + f"`, {time.strftime('%Y-%m-%d')}. Generated LOCO trays at 256 px, {args.shots} shots, 16 good and 4 of "
            "each anomaly type per test set. Image AUROC against the good test images: per group mean ± std over "
            "runs, per type the mean over runs (4 images of a type per run: read the columns as coarse).\n\n"
            + tables(store))
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
