"""Logical vs structural anomalies: k-shot tables per method on generated MVTec LOCO-layout sets,
the composition detector's score ablation, and composition on the real BSData set.

    python benchmarks/loco_logical.py [--methods composition,patchknn,gcad] [--loco-seeds 0,1]
        [--shots 1,2,4,8] [--seeds 5] [--seeds-for gcad=1] [--ablation-shots 4]
        [--bsdata-shots 1,2,4,8] [--bsdata-seeds 2] [--work DIR]
        [--categories assembly,photo_assembly] [--photos DIR] [--size 256] [--n-train 40]
        [--n-test-good 20] [--per-type 8] [--config LABEL=METHOD:KEY=VALUE,...] [--out NAME]

``--categories`` adds the photo LOCO category (parts cut out of real photos; needs ``--photos``, by
default ../shared/datasets, and the elpv-dataset package; left out with a message when absent).
``--config`` runs a method under a label with parameters (repeatable), e.g.
``--config fused=composition:views=2,normalise=pooled,structural=patchknn``; its values are
read as JSON where they parse. ``--out`` names the results (benchmarks/results/NAME.json/.md).

LOCO data: ``defectlens generate WORK/loco-S --kind loco --seed S`` per generator seed S (category
"assembly": 40 train, 20 good, 40 logical and 24 structural test images), written when missing.
Methods default to composition, patchknn and gcad when it is registered; each runs the k-shot
protocol of ``run_benchmark`` (same shot picks for every method). Every finished block is kept in
benchmarks/results/loco_logical.json and skipped when the script runs again with the same shots
and seeds, so a sweep resumes, and a method added later (``--methods gcad``) joins the same
tables; the markdown is rewritten from the JSON after each block.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from defectlens.data.datasets import load_dataset
from defectlens.data.io import read_image
from defectlens.data.kshot import sample_shots
from defectlens.data.generator import generate
from defectlens.errors import UsageError
from defectlens.engine.benchmark import parse_shots, run_benchmark
from defectlens.engine.fit import normal_training_samples
from defectlens.metrics import image_auroc
from defectlens.models import REGISTRY, create_detector
from defectlens.models.composition.model import SCORES, WRITE_UP_SCORES, combine
from defectlens.report.benchmark import jsonable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_suite import parse_config as method_config  # noqa: E402

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parents[1] / "shared" / "datasets"
BSDATA = PHOTOS / "bsdata" / "ball_screw"
OUT = HERE / "results" / "loco_logical"
#: Ways to join the calibrated scores: the write-up's plain sum of its seven and the detector's norm
#: of all nine (the seven, the patch words and their placement) with the detector's weights.
COMBINATIONS = {"sum": lambda c, weights: sum(c[s] for s in WRITE_UP_SCORES),
                "norm": lambda c, weights: combine(c, SCORES, weights)}
COMBINATION_LABELS = {"sum": "plain sum of the write-up's seven", "norm": "Euclidean norm of the nine (the detector)"}


def mean_std(values) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def compact(result) -> dict:
    """What the tables need from a run_benchmark result: per run, the image AUROC of the groups
    and the sPRO of the maps, plus timings."""
    runs = []
    for run in result.runs:
        metrics = run["metrics"]
        runs.append({
            "shots": run["shots"], "seed": run["seed"], "fit_seconds": run["fit_seconds"],
            "score_ms_per_image": run["score_ms_per_image"], "fpr_at_threshold": run["fpr_at_threshold"],
            "tpr_at_threshold": run["tpr_at_threshold"],
            **{f"{block}.{name}": metrics.get(block, {}).get(name)
               for block in ("all", "logical", "structural")
               for name in ("image_auroc", "pixel_auroc", "au_spro_0.05", "au_spro_0.3")},
        })
    return {"n_train": result.n_train, "n_test": result.n_test, "runs": runs}


def ablation(folder: Path, shots: int, seeds: int) -> list[dict]:
    """Each of the nine calibrated scores alone and their combinations, per shot seed: logical and
    structural image AUROC. Same shot picks as run_benchmark; features computed once."""
    dataset = load_dataset(folder)
    train = normal_training_samples(dataset)
    test = [s for s in dataset.test if s.label in (0, 1)]
    labels = np.array([s.label for s in test])
    groups = np.array(["good" if s.label == 0 else "logical" if s.logical else "structural" for s in test])
    images = [read_image(s.path) for s in test]
    features = create_detector("composition").backbone_network.embed(images, progress="ablation features", total=len(images))
    rows = []
    for seed in range(seeds):
        row = {"seed": seed}
        # Both scoring forms (docs/fidelity.md); the published one's keys are prefixed.
        for scoring, prefix in (("refined", ""), ("published", "published:")):
            detector = create_detector("composition", seed=seed, scoring=scoring).fit(
                [s.path for s in sample_shots(train, shots, seed)])
            parts, _ = detector.compose(images, features)
            calibrated = [detector.score_parts(p)[0] for p in parts]
            for name in (*SCORES, *COMBINATIONS):
                scores = np.array([COMBINATIONS[name](c, detector.weights) if name in COMBINATIONS else c[name] for c in calibrated])
                for group in ("logical", "structural"):
                    chosen = (groups == group) | (groups == "good")
                    row[f"{prefix}{name}.{group}"] = image_auroc(labels[chosen], scores[chosen])
        rows.append(row)
    return rows


def parse_config(text: str) -> tuple[str, str, dict]:
    """LABEL=METHOD[:KEY=VALUE,...] -> (label, method, params); a bare METHOD is its own label.
    Values are JSON where they parse, objects included (real_suite.py's rule)."""
    label, _, spec = text.partition("=") if "=" in text.split(":")[0] else (text, "", text)
    method, params = method_config(spec)
    return label, method, params


def data_category(data: str) -> str:
    """The category of a data key: "loco-S" (the original sets) is assembly, else "<category>-S"."""
    return "assembly" if data.startswith("loco-") else data.rsplit("-", 1)[0]


def per_set_std(runs: list[dict], key: str) -> str:
    """Mean over generator sets of the std over shot draws: how much the shots alone move a result."""
    stds = []
    for data in sorted({r["data"] for r in runs}):
        values = [r[key] for r in runs if r["data"] == data and r.get(key) is not None]
        if len(values) > 1:
            stds.append(float(np.std(values)))
    return f"{np.mean(stds):.3f}" if stds else "–"


def bsdata_lines(blocks: dict) -> list[str]:
    """The BSData table of composition, when the store holds BSData runs."""
    bsdata = {k: v for k, v in blocks.items() if k.startswith("bsdata/")}
    if not bsdata:
        return []
    lines = ["", "## BSData ball_screw (real pitting defects: structural only)\n",
             ("325 pitting and 284 good test images; image AUROC, pixel AUROC of the maps. Patch-kNN and the "
              "other detectors on the same protocol: bsdata_quality.md.\n"),
             "| method | shots | runs | image AUROC | pixel AUROC | FPR / TPR at threshold | fit s | ms/image |",
             "|---|---|---|---|---|---|---|---|"]
    for key, value in sorted(bsdata.items()):
        for shots in sorted({r["shots"] for r in value["runs"]}):
            group = [r for r in value["runs"] if r["shots"] == shots]
            def col(name, group=group):
                return mean_std([r.get(name) for r in group])
            lines.append(f"| {key.split('/')[1]} | {shots} | {len(group)} | {col('all.image_auroc')} | "
                         f"{col('all.pixel_auroc')} | {col('fpr_at_threshold')} / {col('tpr_at_threshold')} | "
                         f"{np.mean([r['fit_seconds'] for r in group]):.1f} | "
                         f"{np.mean([r['score_ms_per_image'] for r in group]):.0f} |")
    return lines


def write_categories_markdown(store: dict, args_line: str) -> None:
    """Tables per category and configuration, for runs over several categories and configs."""
    loco = {k: v for k, v in store["blocks"].items() if k.startswith("loco/")}
    runs = [{**r, "data": k.split("/")[1], "label": k.split("/")[2]} for k, v in loco.items() for r in v["runs"]]
    setup = store.get("setup", {})
    lines = [
        "# Logical and structural anomalies at few shots: generated LOCO sets, synthetic and cut from real photos\n",
        (f"{args_line} on a {platform.machine()} machine, {len(os.sched_getaffinity(0))} cores (shared; nice 10), "
         f"{time.strftime('%Y-%m-%d')}.\n"),
        (f"Data: `defectlens generate DIR --kind loco --categories C --seed S --size {setup.get('size')}` with "
         f"{setup.get('n_train')} train, {setup.get('n_test_good')} good test images and {setup.get('per_type')} of each "
         "of five logical and three structural anomaly types. assembly: the synthetic tray; photo_assembly: the same "
         "rules with every part and surface cut out of real photos (BSData metal, DeepPCB boards, ELPV cells; real "
         "pits and cracked cells as structural defects). Image AUROC of logical and of structural anomalies, each "
         "against all good test images; AUC-sPRO (FPR ≤ 0.05, normalised, as the official LOCO evaluation) of the "
         "anomaly maps. Mean ± std over all runs (generator seeds × shot draws, shot picks shared by all "
         "configurations); `draw std` is the mean over generator seeds of the std over shot draws alone.\n"),
        "Configurations: " + "; ".join(f"`{label}` = {spec}" for label, spec in sorted(store.get("configs", {}).items())) + "\n",
        ("| category | configuration | shots | runs | logical AUROC | draw std | structural AUROC | draw std | "
         "all AUROC | sPRO@0.05 logical | sPRO@0.05 structural | FPR / TPR at threshold |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for category in sorted({data_category(r["data"]) for r in runs}):
        for label in sorted({r["label"] for r in runs}):
            mine = [r for r in runs if r["label"] == label and data_category(r["data"]) == category]
            for shots in sorted({r["shots"] for r in mine}):
                group = [r for r in mine if r["shots"] == shots]
                def col(key, group=group):
                    return mean_std([r.get(key) for r in group])
                lines.append(
                    f"| {category} | {label} | {shots} | {len(group)} | {col('logical.image_auroc')} | "
                    f"{per_set_std(group, 'logical.image_auroc')} | {col('structural.image_auroc')} | "
                    f"{per_set_std(group, 'structural.image_auroc')} | {col('all.image_auroc')} | "
                    f"{col('logical.au_spro_0.05')} | {col('structural.au_spro_0.05')} | "
                    f"{col('fpr_at_threshold')} / {col('tpr_at_threshold')} |")
    lines += ["", "Per generator set (logical / structural image AUROC, mean ± std over shot draws):", "",
              "| configuration | set | shots | logical | structural |", "|---|---|---|---|---|"]
    for key in sorted(loco):
        _, data, label = key.split("/")
        for shots in sorted({r["shots"] for r in loco[key]["runs"]}):
            group = [r for r in loco[key]["runs"] if r["shots"] == shots]
            lines.append(f"| {label} | {data} | {shots} | {mean_std([r['logical.image_auroc'] for r in group])} | "
                         f"{mean_std([r['structural.image_auroc'] for r in group])} |")
    lines += bsdata_lines(store["blocks"])
    store_out = Path(store["out"])
    store_out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def write_markdown(store: dict, args_line: str) -> None:
    if store.get("out", str(OUT)) != str(OUT):
        write_categories_markdown(store, args_line)
        return
    blocks = store["blocks"]
    loco = {k: v for k, v in blocks.items() if k.startswith("loco/")}
    methods = sorted({k.split("/")[2] for k in loco}, key=lambda m: (m != "composition", m))
    lines = [
        "# Logical vs structural anomalies (generated MVTec LOCO layout), k-shot\n",
        (f"{args_line} on a {platform.machine()} machine, {len(os.sched_getaffinity(0))} cores, "
         f"torch threads {os.environ.get('DEFECTLENS_THREADS', 'all')}, {time.strftime('%Y-%m-%d')}.\n"),
        ("Data: `defectlens generate DIR --kind loco --seed S` (category assembly: 40 train, 20 good, 8 of each of five "
        "logical and three structural anomaly types in test). Image AUROC of logical and of structural anomalies, each "
        "against all good test images; AUC-sPRO (FPR ≤ 0.05, normalised; saturation areas from defects_config.json, "
        "FPR over the defect-free pixels of all test images, as the official LOCO evaluation) of the anomaly maps. "
        "Mean ± std over all runs: every generator seed × shot seed (shot picks shared by all methods). Times are wall-clock on a shared machine: noisy; `fit s` excludes the "
        "backbone only for patchknn (features computed once per sweep), composition and gcad fit end to end.\n"),
        ("| method | shots | runs | logical AUROC | structural AUROC | all AUROC | sPRO@0.05 logical | "
         "sPRO@0.05 structural | FPR / TPR at threshold | fit s | ms/image |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        runs = [r for k, v in loco.items() if k.split("/")[2] == method for r in v["runs"]]
        for shots in sorted({r["shots"] for r in runs}):
            group = [r for r in runs if r["shots"] == shots]
            def col(key, group=group):
                return mean_std([r.get(key) for r in group])
            rates = f"{col('fpr_at_threshold')} / {col('tpr_at_threshold')}"
            fit = f"{np.mean([r['fit_seconds'] for r in group]):.1f}"
            ms = f"{np.mean([r['score_ms_per_image'] for r in group]):.0f}"
            lines.append(f"| {method} | {shots} | {len(group)} | {col('logical.image_auroc')} | "
                         f"{col('structural.image_auroc')} | {col('all.image_auroc')} | {col('logical.au_spro_0.05')} | "
                         f"{col('structural.au_spro_0.05')} | {rates} | {fit} | {ms} |")
    lines += ["", "Per generator seed (logical / structural image AUROC):", "",
              "| method | data | " + " | ".join(f"{s} shots" for s in store["shots"]) + " |",
              "|---|---|" + "---|" * len(store["shots"])]
    for key in sorted(loco, key=lambda k: (methods.index(k.split("/")[2]), k)):
        _, data, method = key.split("/")
        cells = []
        for shots in store["shots"]:
            group = [r for r in loco[key]["runs"] if r["shots"] == shots]
            cells.append(f"{mean_std([r['logical.image_auroc'] for r in group])} / "
                         f"{mean_std([r['structural.image_auroc'] for r in group])}" if group else "–")
        lines.append(f"| {method} | {data} | " + " | ".join(cells) + " |")
    ablations = {k: v for k, v in blocks.items() if k.startswith("ablation/")}
    if ablations:
        rows = [row for v in ablations.values() for row in v["rows"]]
        shots = next(iter(ablations.values()))["shots"]
        lines += ["", f"## Ablation: the composition scores at {shots} shots\n",
                  (f"Each calibrated score alone, their plain sum and their norm (the detector's image score), "
                   f"{len(rows)} runs ({', '.join(k.split('/')[1] for k in sorted(ablations))} × shot seeds).\n"),
                  "| score | logical AUROC | structural AUROC |", "|---|---|---|"]
        for prefix in ("", "published:"):
            if not all(f"{prefix}sum.logical" in r for r in rows):
                continue  # stored before the published scoring existed
            for name in (*SCORES, *COMBINATIONS):
                label = ("published scoring: " if prefix else "") + COMBINATION_LABELS.get(name, name)
                # .get: runs stored before the words score have no words column (a dash)
                lines.append(f"| {label} | {mean_std([r.get(f'{prefix}{name}.logical') for r in rows])} | "
                             f"{mean_std([r.get(f'{prefix}{name}.structural') for r in rows])} |")
    lines += bsdata_lines(blocks)
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def command_line(args) -> str:
    """The command as run: repeatable options repeated, --methods left out when --config replaces it,
    an empty value quoted."""
    parts = []
    for key, value in vars(args).items():
        if key == "work" or value in ([], None) or (key == "methods" and args.config):
            continue
        flag = f"--{key.replace('_', '-')}"
        if key == "config":
            parts += [f"{flag} {v}" for v in value]
        else:
            text = ",".join(value) if isinstance(value, list) else str(value)
            parts.append(f"{flag} {text or chr(34) * 2}")
    return "`python benchmarks/loco_logical.py " + " ".join(parts) + "`"


def main() -> None:
    parser = argparse.ArgumentParser()
    default_methods = ["composition", "patchknn"] + (["gcad"] if "gcad" in REGISTRY else [])
    parser.add_argument("--methods", default=",".join(default_methods))
    parser.add_argument("--loco-seeds", default="0,1")
    parser.add_argument("--shots", default="1,2,4,8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seeds-for", action="append", default=[], metavar="METHOD=N",
                        help="fewer shot seeds for a slow method, e.g. gcad=1")
    parser.add_argument("--ablation-shots", type=int, default=4, help="0 skips the ablation")
    parser.add_argument("--bsdata-shots", default="1,2,4,8", help="empty skips BSData")
    parser.add_argument("--bsdata-seeds", type=int, default=2)
    parser.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "defectlens-loco"))
    parser.add_argument("--categories", default="assembly", help="LOCO categories: assembly, photo_assembly")
    parser.add_argument("--photos", default=str(PHOTOS), help="real photos of photo_assembly (BSData, DeepPCB)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test-good", type=int, default=20)
    parser.add_argument("--per-type", type=int, default=8, help="test images per anomaly type")
    parser.add_argument("--config", action="append", default=[], metavar="LABEL=METHOD:KEY=VALUE,...",
                        help="a method under a label with parameters (repeatable); replaces --methods")
    parser.add_argument("--out", default=OUT.name, help="results name under benchmarks/results")
    args = parser.parse_args()
    seeds_for = {pair.split("=")[0]: int(pair.split("=")[1]) for pair in args.seeds_for}
    shots = parse_shots(args.shots)
    out = HERE / "results" / args.out
    store = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"blocks": {}}
    store["shots"] = shots
    store["out"] = str(out)
    store["setup"] = {"size": args.size, "n_train": args.n_train, "n_test_good": args.n_test_good, "per_type": args.per_type}
    configs = [parse_config(c) for c in args.config] or [(m, m, {}) for m in args.methods.split(",")]
    store.setdefault("configs", {}).update(
        {label: f"{method} " + " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items())
         for label, method, params in configs})
    args_line = command_line(args)

    def save() -> None:
        out.with_suffix(".json").write_text(json.dumps(jsonable(store), indent=1, allow_nan=False))
        write_markdown(store, args_line)

    folders = {}
    counts = dict(size=args.size, n_train=args.n_train, n_test_good=args.n_test_good, n_test_defect_per_type=args.per_type)
    original = counts == dict(size=256, n_train=40, n_test_good=20, n_test_defect_per_type=8)
    for category in args.categories.split(","):
        for loco_seed in (int(s) for s in args.loco_seeds.split(",") if s):
            if original and category == "assembly":  # the sets of the original tables
                where, data = Path(args.work) / f"loco-{loco_seed}", f"loco-{loco_seed}"
            else:
                where = Path(args.work) / f"{category}-{loco_seed}-{args.size}px-{args.n_train}-{args.n_test_good}-{args.per_type}"
                data = f"{category}-{loco_seed}"
            if not (where / category).is_dir():
                try:
                    generate(where, kind="loco", seed=loco_seed, categories=[category], photos=args.photos, **counts)
                except UsageError as error:
                    print(f"skipping {category}: {error}")
                    break
            folders[data] = where / category

    for label, method, params in configs:
        if method not in REGISTRY:
            print(f"skipping {method}: not registered in this defectlens")
            continue
        for data, folder in folders.items():
            key, seeds = f"loco/{data}/{label}", seeds_for.get(label, args.seeds)
            done = store["blocks"].get(key)
            if done and done["shots"] == shots and done["seeds"] == seeds:
                continue
            started = time.perf_counter()
            result = run_benchmark(folder, method=method, shots=shots, seeds=seeds, params=params or None)
            store["blocks"][key] = {"shots": shots, "seeds": seeds, "seconds": time.perf_counter() - started, **compact(result)}
            save()
            print(f"{key}: {time.perf_counter() - started:.0f} s", flush=True)

    if args.ablation_shots:
        for data, folder in folders.items():
            key = f"ablation/{data}"
            done = store["blocks"].get(key)
            if done and done["shots"] == args.ablation_shots and len(done["rows"]) == args.seeds:
                continue
            store["blocks"][key] = {"shots": args.ablation_shots, "rows": ablation(folder, args.ablation_shots, args.seeds)}
            save()
            print(f"{key} done", flush=True)

    bsdata_shots = parse_shots(args.bsdata_shots) if args.bsdata_shots else []
    if bsdata_shots and BSDATA.is_dir():
        key = "bsdata/composition"
        done = store["blocks"].get(key)
        if not (done and done["shots"] == bsdata_shots and done["seeds"] == args.bsdata_seeds):
            started = time.perf_counter()
            result = run_benchmark(BSDATA, method="composition", shots=bsdata_shots, seeds=args.bsdata_seeds)
            store["blocks"][key] = {"shots": bsdata_shots, "seeds": args.bsdata_seeds,
                                    "seconds": time.perf_counter() - started, **compact(result)}
            save()
    save()


if __name__ == "__main__":
    main()
