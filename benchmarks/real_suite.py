"""The real-data suite: detectors × configurations across real sets nobody tuned on, full-shot and
k-shot × seeds, with a headline (mean over the real sets), the worst set and a leave-one-set-out view.

    python benchmarks/real_suite.py --methods patchcore,padim --shots full --seeds 1
    python benchmarks/real_suite.py --config "patchcore:bank_size=16384,reweight_neighbours=0" --shots 4 --seeds 3
    python benchmarks/real_suite.py --report-only
    python benchmarks/real_suite.py --methods padim --sets bsdata --rerun   # replace cached runs

Sets: bsdata (metal, tiny pits, masks), deeppcb (PCB scans, small defects, box masks), elpv-mono and
elpv-poly (solar cells, image labels only; `pip install -e ".[bench]"`), plus the generator's
categories as a sanity column outside the headline: gen-fabric and gen-washer by default, any of its
13 (gen-wood, gen-screw, ...) with --sets; `--sets gen-all` writes to generator_suite.json/md:

    python benchmarks/real_suite.py --sets gen-all --shots full,4 --seeds 5 --config patchknn:geometry=tiles

Every run (method, params, set, shots, seed) is one `run_benchmark` call on a copy of the set whose
training list holds just that run's shots, so it is cached on its own in the JSON
(benchmarks/results/real_suite.json) and a rerun skips it: runs can be split across invocations,
interrupted and resumed. The JSON is re-read before each write, so parts run side by side merge.
The Markdown report (real_suite.md) is rebuilt from every cached run at the end of each invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from defectlens import __version__
from defectlens.cli import parse_params
from defectlens.data.datasets import Dataset, load_dataset
from defectlens.data.elpv import CERTAIN_DEFECT, DEFECT_TYPES, load_elpv
from defectlens.data.io import as_image
from defectlens.data.kshot import sample_shots
from defectlens.data.generator import MVTEC_CATEGORIES, generate
from defectlens.engine.benchmark import run_benchmark
from defectlens.engine.fit import normal_training_samples
from defectlens.models import MANY_IMAGES, REGISTRY, create_detector, default_config
from defectlens.models.base import LearningType
from defectlens.models.calibration import CROSS_FOLDS, LEAVE_ONE_OUT_MAX

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "datasets"
RESULTS = HERE / "results" / "real_suite"
GENERATED_RESULTS = HERE / "results" / "generator_suite"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "defectlens" / "real_suite"
REAL_SETS = ("bsdata", "deeppcb", "elpv-mono", "elpv-poly")
SANITY_SETS = ("gen-fabric", "gen-washer")
#: Every category the generator draws (surfaces, textures, objects): `--sets gen-all`.
GENERATED_SETS = tuple(f"gen-{category}" for category in MVTEC_CATEGORIES)
LOSO_METRIC = "image_auroc"
DETAIL_METRICS = ("image_auroc", "image_aupr", "f1_max", "pixel_auroc", "au_pro", "fpr", "tpr",
                  "fit_seconds", "ms_per_image", "wall_seconds")


@dataclasses.dataclass(frozen=True)
class SuiteSet:
    name: str
    load: Callable[[], Dataset]
    headline_type: str | None = None  # image metrics of this defect type against the good images; None: all
    has_masks: bool = True


def _generated(category: str) -> Dataset:
    folder = CACHE / "generated-seed0"
    if not (folder / category).is_dir():
        generate(folder, kind="mvtec", seed=0, categories=[category])
    return load_dataset(folder / category)


SETS = {
    "bsdata": SuiteSet("bsdata", lambda: load_dataset(SHARED / "bsdata" / "ball_screw")),
    "deeppcb": SuiteSet("deeppcb", lambda: load_dataset(SHARED / "deeppcb" / "pcb")),
    "elpv-mono": SuiteSet("elpv-mono", lambda: load_elpv("mono"), CERTAIN_DEFECT, False),
    "elpv-poly": SuiteSet("elpv-poly", lambda: load_elpv("poly"), CERTAIN_DEFECT, False),
    **{name: SuiteSet(name, lambda category=name[4:]: _generated(category)) for name in GENERATED_SETS},
}


# ---- configurations and run keys ------------------------------------------------------------


def parse_config(text: str) -> tuple[str, dict]:
    """"patchcore:bank_size=16384,reweight_neighbours=0" -> ("patchcore", {...}); commas inside
    [...], {...} or "..." belong to a JSON value: 'ensemble:members=["padim","patchknn"],member_params={"patchknn":
    {"bank_size":65536,"search":"ivf"}}', 'patchknn:backbone="efficientnet-lite0@2,3,4"'."""
    method, _, rest = text.partition(":")
    method = method.strip()
    if method not in REGISTRY:
        raise SystemExit(f"--config {text!r}: unknown method {method!r}; available: {', '.join(sorted(REGISTRY))}")
    pairs, depth, start, quoted = [], 0, 0, False
    for index, char in enumerate(rest + ","):
        quoted ^= char == '"'
        depth += (not quoted) * ((char in "[{") - (char in "]}"))
        if char == "," and depth == 0 and not quoted:
            pairs.append(rest[start:index])
            start = index + 1
    return method, parse_params([pair for pair in pairs if pair.strip()])


def config_name(method: str, params: dict) -> str:
    if not params:
        return method
    return f"{method}[{','.join(f'{k}={json.dumps(v)}' for k, v in sorted(params.items()))}]"


def shipped(regime: str = "full-shot") -> tuple[str, dict]:
    """(method, params) `fit` ships without --method for this regime's number of good images."""
    shots = regime.split("-")[0]
    return default_config(int(shots) if shots.isdigit() else None)


def shipped_config(regime: str = "full-shot") -> str:
    """The name of ``shipped(regime)``: the baseline of every comparison."""
    return config_name(*shipped(regime))


AS_FIT_TAKES_IT = "the default as fit takes it"


def shipped_cells(configs: dict, regime: str) -> dict:
    """{set: (config, cell)} of the default as `fit` takes it: its tiled configuration, or the same
    squashed (no geometry parameter) on a set where only that was run, as fit squashes tiles whose
    features would exceed engine.fit.TILED_FEATURE_BUDGET."""
    method, params = shipped(regime)
    candidates = (config_name(method, params), config_name(method, {k: v for k, v in params.items() if k != "geometry"}))
    cells = {}
    for name in REAL_SETS:
        for config in candidates:
            if configs.get(config, {}).get(name, {}).get(LOSO_METRIC):
                cells[name] = (config, configs[config][name])
                break
    return cells


def run_key(config: str, set_name: str, shots: str, seed: int, max_test: int | None = None) -> str:
    return f"{config}|{set_name}|{shots}|{seed}" + (f"|test{max_test}" if max_test else "")


def test_subset(dataset: Dataset, max_test: int | None) -> Dataset:
    """At most ``max_test`` test images, the same share of each defect type (and of the good
    ones), picked with a fixed seed: a cheaper, noisier protocol, marked as such in the report."""
    labelled = [s for s in dataset.test if s.label in (0, 1)]
    if not max_test or max_test >= len(labelled):
        return dataset
    kept = []
    for defect_type in sorted({s.defect_type for s in labelled}):
        group = sorted((s for s in labelled if s.defect_type == defect_type), key=lambda s: s.path)
        count = max(1, round(max_test * len(group) / len(labelled)))
        kept += [group[i] for i in sorted(np.random.default_rng(0).permutation(len(group))[:count])]
    return dataclasses.replace(dataset, test=sorted(kept, key=lambda s: s.path))


# ---- shared backbone features ------------------------------------------------------------------


class FeatureMemo:
    """Backbone features by image content, kept for one set: every run of an invocation on that set
    (each method, seed and shot count) then embeds each image once. The backbone is frozen and
    shared per (name, size) by `get_backbone`, so this changes no result, only the time."""

    CHUNK = 16

    def __init__(self) -> None:
        self.features: dict[tuple, torch.Tensor] = {}
        self.wrapped: dict[int, object] = {}

    def clear(self) -> None:
        self.features.clear()

    def install(self, detector) -> None:
        backbone = getattr(detector, "backbone_network", None)
        if backbone is None or id(backbone) in self.wrapped:
            return
        self.wrapped[id(backbone)] = backbone
        original = backbone.embed

        def embed(images, progress=None, total=None):
            keys, pending = [], []
            for item in images:  # consume lazily: callers' iterators read images one by one
                image = as_image(item)
                key = (id(backbone), image.shape, hashlib.blake2b(np.ascontiguousarray(image).tobytes()).digest())
                keys.append(key)
                if key not in self.features and all(key != k for k, _ in pending):
                    pending.append((key, image))
                if len(pending) == self.CHUNK:
                    self._embed(original, pending)
            self._embed(original, pending)
            if not keys:
                return original([])
            return torch.stack([self.features[key] for key in keys])

        backbone.embed = embed

    def _embed(self, original, pending: list) -> None:
        if pending:
            for (key, _), feature in zip(pending, original([image for _, image in pending])):
                self.features[key] = feature.clone()
            pending.clear()


MEMO = FeatureMemo()


# ---- one run ----------------------------------------------------------------------------------


def single_run(result) -> tuple[dict, list, float | None]:
    """The only run, its per-image records and its threshold out of a `run_benchmark` result:
    the one place that knows that result's shape."""
    return result.runs[0], result.records, result.threshold


def _rate(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def measure(suite_set: SuiteSet, dataset: Dataset, method: str, params: dict, shots: str, seed: int,
            max_test: int | None = None, memo: bool = True) -> dict:
    """One run of ``method`` on ``shots`` ("full", "0" or k) normal images picked with ``seed``."""
    train = normal_training_samples(dataset)
    if shots != "full":
        train = sample_shots(train, int(shots), seed)
    subset = dataclasses.replace(dataset, train=train)
    if memo:
        MEMO.install(create_detector(method, **params))
    started = time.perf_counter()
    result = run_benchmark(dataset.root, method=method, shots=["full"], seeds=[seed], params=params, dataset=subset)
    wall = time.perf_counter() - started
    run, records, threshold = single_run(result)
    headline = run["metrics"][suite_set.headline_type or "all"]
    good = [r for r in records if r.label == 0]
    scored = [r for r in records if r.label == 1 and r.defect_type == suite_set.headline_type] \
        if suite_set.headline_type else [r for r in records if r.label == 1]
    entry = {
        "set": suite_set.name, "method": method, "params": params, "shots": shots, "n_shots": len(train),
        "seed": seed, "n_test": len(records), "test_subset": max_test, "threshold": threshold,
        "image_auroc": headline["image_auroc"], "image_aupr": headline["image_aupr"], "f1_max": headline["f1_max"],
        "pixel_auroc": _finite(run["metrics"]["all"].get("pixel_auroc")) if suite_set.has_masks else None,
        "au_pro": _finite(run["metrics"]["all"].get("au_pro")) if suite_set.has_masks else None,
        # Share of good / headline-defective test images above the model's own normal-only threshold.
        "fpr": _rate([r.score > threshold for r in good]) if threshold is not None else None,
        "tpr": _rate([r.score > threshold for r in scored]) if threshold is not None else None,
        "fit_seconds": run["fit_seconds"], "ms_per_image": run["score_ms_per_image"], "wall_seconds": wall,
        "per_type_auroc": {name: block["image_auroc"] for name, block in run["metrics"].items() if name != "all"},
        "per_type_tpr": {name: _rate([r.score > threshold for r in records if r.label == 1 and r.defect_type == name])
                         for name in {r.defect_type for r in records if r.label == 1}} if threshold is not None else {},
        "version": __version__, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "calibration_folds": CROSS_FOLDS,
    }
    return entry


# ---- the cache ----------------------------------------------------------------------------------


def load_runs(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"{path}: not a real-suite results file ({error}); move it away or pass another --json")


def save_run(path: Path, key: str, entry: dict) -> dict:
    """Add one run to the JSON, keeping whatever other invocations wrote meanwhile."""
    runs = load_runs(path)
    runs[key] = entry
    write_runs(path, runs)
    return runs


def write_runs(path: Path, runs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"runs": dict(sorted(runs.items()))}, indent=1, default=float), encoding="utf-8")
    temporary.replace(path)


# ---- aggregation ---------------------------------------------------------------------------------


def regime_of(shots: str) -> str:
    return {"full": "full-shot", "0": "zero-shot"}.get(shots, f"{shots}-shot")


def aggregate(runs: dict) -> dict:
    """{regime: {config: {set: {metric: (mean, std, n_seeds)}}}} over seeds."""
    grouped: dict = {}
    for entry in runs.values():
        config = config_name(entry["method"], entry["params"])
        grouped.setdefault(regime_of(entry["shots"]), {}).setdefault(config, {}).setdefault(entry["set"], []).append(entry)
    table: dict = {}
    for regime, configs in grouped.items():
        for config, sets in configs.items():
            for set_name, entries in sets.items():
                whole = [e for e in entries if not e.get("test_subset")]
                entries = whole or entries  # a run on the whole test set outranks subset runs
                cell = {"subset": None if whole else max(e["test_subset"] for e in entries),
                        # Runs before cross-fold calibration held out one fifth of more than 10 shots.
                        "one_fold": any("calibration_folds" not in e and e["n_shots"] > LEAVE_ONE_OUT_MAX for e in entries)}
                for metric in DETAIL_METRICS:
                    values = [e[metric] for e in entries if e.get(metric) is not None and math.isfinite(e[metric])]
                    cell[metric] = (float(np.mean(values)), float(np.std(values)), len(values)) if values else None
                for name in sorted({n for e in entries for n in e["per_type_auroc"]}):
                    values = [e["per_type_auroc"][name] for e in entries if name in e["per_type_auroc"]]
                    cell[f"auroc[{name}]"] = (float(np.mean(values)), float(np.std(values)), len(values))
                table.setdefault(regime, {}).setdefault(config, {})[set_name] = cell
    return table


def headline(cells: dict, metric: str = LOSO_METRIC, sets: tuple[str, ...] = REAL_SETS) -> tuple[float, str, float] | None:
    """(mean over ``sets``, the real ones unless named, worst set, its value), or None unless every one has a run."""
    values = {name: cells[name][metric][0] for name in sets if name in cells and cells[name].get(metric)}
    if len(values) < len(sets):
        return None
    worst = min(values, key=values.get)
    return float(np.mean(list(values.values()))), worst, values[worst]


def leave_one_set_out(configs: dict, regime: str, metric: str = LOSO_METRIC) -> list[dict]:
    """Per real set: the configuration with the best mean over the other real sets, and its value
    on the left-out set, beside the best configuration there (an oracle) and the default."""
    complete = {c: cells for c, cells in configs.items() if headline(cells, metric) is not None}
    shipped = shipped_cells(configs, regime)
    if len(shipped) == len(REAL_SETS):  # a candidate too, as fit takes it (tiled, squashed past the budget)
        complete[AS_FIT_TAKES_IT] = {name: cell for name, (_, cell) in shipped.items()}
    rows = []
    for left_out in REAL_SETS:
        others = [name for name in REAL_SETS if name != left_out]
        chosen = max(complete, key=lambda c: np.mean([complete[c][n][metric][0] for n in others]), default=None)
        if chosen is None:
            continue
        oracle = max(complete, key=lambda c: complete[c][left_out][metric][0])
        default = shipped_cells(configs, regime).get(left_out)
        rows.append({"left_out": left_out, "chosen": chosen, "chosen_value": complete[chosen][left_out][metric][0],
                     "oracle": oracle, "oracle_value": complete[oracle][left_out][metric][0],
                     "default_value": default[1][metric][0] if default else None})
    return rows


def _shots_order(regime: str) -> float:
    """Zero-shot, then k-shot by k, then full-shot: the x axis of the shot curves."""
    return 0.0 if regime == "zero-shot" else math.inf if regime == "full-shot" else float(regime.split("-")[0])


def shot_curves(table: dict) -> dict[str, dict[str, float]]:
    """{configuration: {regime: mean image AUROC over the real sets}} for every configuration
    measured on all the real sets in at least two regimes, and for the default as `fit` takes it
    (which changes configuration with the number of good images)."""
    curves: dict = {}
    for regime, configs in table.items():
        for config, cells in configs.items():
            summary = headline(cells)
            if summary:
                curves.setdefault(config, {})[regime] = summary[0]
        shipped = shipped_cells(configs, regime)
        if len(shipped) == len(REAL_SETS):
            curves.setdefault(AS_FIT_TAKES_IT, {})[regime] = float(np.mean([cell[LOSO_METRIC][0] for _, cell in shipped.values()]))
    return {config: points for config, points in curves.items() if len(points) >= 2}


def _curve_regimes(curves: dict[str, dict[str, float]]) -> list[str]:
    """Every regime of the shot curves, in ``_shots_order``."""
    return sorted({regime for points in curves.values() for regime in points}, key=_shots_order)


def plot_shot_curves(curves: dict[str, dict[str, float]], path: Path) -> None:
    """The shot curves as a figure: mean image AUROC over the real sets against the number of shots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = _curve_regimes(curves)
    figure, axes = plt.subplots(figsize=(10, 5.5))
    for config, points in sorted(curves.items(), key=lambda item: item[0] != AS_FIT_TAKES_IT):
        shown = [regime for regime in regimes if regime in points]
        default = config == AS_FIT_TAKES_IT
        axes.plot([regimes.index(r) for r in shown], [points[r] for r in shown], marker="o",
                  linewidth=2.5 if default else 1.2, linestyle="--" if default else "-", color="black" if default else None,
                  zorder=3 if default else 2,
                  label=textwrap.shorten(config, 70, placeholder="…"))
    axes.set_xticks(range(len(regimes)), [r.replace("-shot", "") for r in regimes])
    axes.set_xlabel("good images given (shots)")
    axes.set_ylabel(f"mean image AUROC over {len(REAL_SETS)} real sets")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _shots_section(curves: dict[str, dict[str, float]], figure: str | None) -> list[str]:
    """The shot curves as a table, below their ``figure`` (named relative to the report) if any."""
    if not curves:
        return []
    regimes = _curve_regimes(curves)
    lines = ["## By the number of shots: mean image AUROC over the real sets", "",
             f"Each configuration measured on all {len(REAL_SETS)} real sets in two regimes or more (k-shot cells: the mean "
             "over draws on each set, then over the sets). The default as `fit` takes it changes configuration "
             f"at {MANY_IMAGES} good images.", ""]
    if figure:
        lines += [f"![mean image AUROC over the real sets by the number of shots]({figure})", ""]
    lines += ["| configuration | " + " | ".join(r.replace("-shot", "") for r in regimes) + " |",
              "|---|" + "---|" * len(regimes)]
    for config, points in sorted(curves.items(), key=lambda item: (item[0] != AS_FIT_TAKES_IT, item[0])):
        name = config if config == AS_FIT_TAKES_IT else f"`{config}`"
        lines.append(f"| {name} | " + " | ".join(f"{points[r]:.3f}" if r in points else "–" for r in regimes) + " |")
    return lines + [""]


# ---- report ---------------------------------------------------------------------------------------


def _cell(value, digits: int = 3, std: bool = True) -> str:
    if value is None:
        return "–"
    mean, spread, count = value
    text = f"{mean:.{digits}f}"
    return f"{text} ± {spread:.{digits}f}" if std and count > 1 else text


def _mark(cell: dict | None) -> str:
    return f" †{cell['subset']}" if cell and cell.get("subset") else ""


def _regime_order(regime: str) -> tuple[int, int]:
    return (0, 0) if regime == "full-shot" else (2, 0) if regime == "zero-shot" else (1, int(regime.split("-")[0]))


def render(runs: dict, figure: Path | None = None) -> str:
    """The Markdown report; with ``figure``, the shot curves are also drawn there (beside the report)."""
    table = aggregate(runs)
    curves = shot_curves(table)
    if figure is not None and curves:
        plot_shot_curves(curves, figure)
    sets = [name for name in (*REAL_SETS, *GENERATED_SETS) if any(e["set"] == name for e in runs.values())]
    # A report of generated sets alone (--sets gen-all) heads its tables with their mean instead.
    real = any(name in REAL_SETS for name in sets)
    group, label = (REAL_SETS, "real") if real else (tuple(sets), f"{len(sets)} generated")
    lines = [
        "# Real-data suite: image AUROC across sets nobody tuned on" if real else
        "# Generator suite: image AUROC on every category the generator draws",
        "",
        f"Generated by `benchmarks/real_suite.py` from {len(runs)} cached runs "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; defectlens {__version__}; "
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores shared with other jobs, so every time is an upper bound).",
        "",
        ("Sets: **bsdata** (ball screws, tiny pits, masks), **deeppcb** (PCB scans, small defects, box masks), "
         "**elpv-mono / elpv-poly** (solar cells, image labels only; a fixed-seed 60 % of the defect-probability-0 "
         "cells train, test = the other probability-0 cells against the probability-1 cells; the 1/3 and 2/3 cells "
         "are reported as their own defect types), and the generator's **gen-fabric / gen-washer** as a sanity column "
         "outside the headline. Headline = mean image AUROC over the four real sets; *worst* = the lowest of them. "
         "k-shot cells are mean ± std over seeds (each seed a different draw of the k normal images). "
         "FPR / TPR: share of good / (certainly) defective test images above the detector's own threshold, which it "
         "set from normal training images only. `fit s` and `ms/img` exclude the backbone for the patch detectors "
         "(backbone features of each image are computed once per set and shared by every run; see speed.md for "
         "end-to-end prediction times). **†N**: measured on a fixed-seed stratified subset of N test images "
         "(same share of each defect type) because the shared machine was too slow for the whole test set; "
         "noisier than the other cells (AUROC std about 0.02–0.03 at N = 200). "
         "Tiled patchknn (alone or as a member) scores an image by 1 % of one tile's patches since 2026-11-30; rows "
         "naming `top_fraction: 0.01` are the runs made before, which averaged 1 % of all the image's tiles' "
         "patches (on ELPV, one tile per cell, both rules compute the same, so its cells appear under both names). "
         "patchknn on an approximate index (`search: ivf`) averages its top patches' exact distances since "
         "2026-11-30 late; runs of such configurations made before averaged the index's distances (the default "
         "full-shot then: BSData 0.9685, DeepPCB 0.981, ELPV mono 0.9526, poly 0.929; the 4-shot default searches "
         "exactly either way).") if real else (
         "Sets: the generator's categories (`defectlens generate --categories all`, seed 0, 256 px: 40 good training "
         "images, 20 good and 40 defective test images with small, low-contrast defects on purpose; surfaces, "
         "textures and objects, the objects turned and placed at random). A sanity view of kinds of product the "
         "real sets lack, never used to choose a default (the lesson of tuning on the generator). "
         "full-shot = all 40 training images, under `default_config`'s MANY_IMAGES: `fit` without --method takes "
         "tiled patchknn there, and the ensemble from 128 good images. k-shot cells are mean ± std over seeds "
         "(each seed a different draw of the k normal images). FPR / TPR: share of good / defective test images "
         "above the detector's own normal-only threshold."),
        "",
    ]
    lines += _shots_section(curves, figure.name if figure is not None else None)
    for regime in sorted(table, key=_regime_order):
        configs = table[regime]
        lines += [f"## {regime}: image AUROC", "",
                  "| configuration | " + " | ".join(sets) + f" | mean ({label}) | worst ({label}) |",
                  "|---|" + "---|" * (len(sets) + 2)]
        ranked = sorted(configs, key=lambda c: -(headline(configs[c], sets=group) or (-1.0,))[0])
        for config in ranked:
            summary = headline(configs[config], sets=group)
            row = [_cell(configs[config].get(name, {}).get(LOSO_METRIC)) + _mark(configs[config].get(name)) for name in sets]
            row += [f"**{summary[0]:.3f}**", f"{summary[2]:.3f} ({summary[1]})"] if summary else ["–", "–"]
            lines.append(f"| `{config}` | " + " | ".join(row) + " |")
        shipped = shipped_cells(configs, regime)
        if len(shipped) == len(REAL_SETS):
            values = {name: cell[LOSO_METRIC][0] for name, (_, cell) in shipped.items()}
            squashed = [name for name, (config, _) in shipped.items() if config != shipped_config(regime)]
            worst = min(values, key=values.get)
            lines += ["", f"The default as `fit` takes it for this regime, `{shipped_config(regime)}`"
                      + (f" (squashed on {', '.join(squashed)}, whose tiles exceed fit's feature budget)" if squashed else "")
                      + f": mean **{np.mean(list(values.values())):.3f}**, worst {values[worst]:.3f} ({worst}); "
                      + ", ".join(f"{name} {value:.3f}" for name, value in values.items()) + "."]
        loso = leave_one_set_out(configs, regime)
        if loso:
            lines += ["", f"Leave-one-set-out ({regime}): the configuration with the best mean image AUROC over the "
                      "other three real sets, reported on the left-out set.", "",
                      f"| left-out set | chosen on the others | its AUROC there | best there (oracle) | default `{shipped_config(regime)}` |",
                      "|---|---|---|---|---|"]
            for row in loso:
                default = "–" if row["default_value"] is None else f"{row['default_value']:.3f}"
                lines.append(f"| {row['left_out']} | `{row['chosen']}` | {row['chosen_value']:.3f} | "
                             f"`{row['oracle']}` {row['oracle_value']:.3f} | {default} |")
            lines.append(f"\nMean of the left-out AUROCs: **{np.mean([r['chosen_value'] for r in loso]):.3f}**.")
        lines.append("")
    lines += _threshold_section(table, sets)
    lines += ["## Per set", ""]
    columns = ("image_auroc", "image_aupr", "f1_max", "pixel_auroc", "au_pro", "fpr", "tpr", "fit_seconds", "ms_per_image")
    for name in sets:
        lines += [f"### {name}", "", "| regime | configuration | " + " | ".join(
            {"fit_seconds": "fit s", "ms_per_image": "ms/img", "wall_seconds": "wall s"}.get(c, c) for c in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
        for regime in sorted(table, key=_regime_order):
            for config, cells in sorted(table[regime].items()):
                if name in cells:
                    row = [_cell(cells[name].get(c), 1 if c in ("fit_seconds", "ms_per_image", "wall_seconds") else 3)
                           for c in columns]
                    lines.append(f"| {regime} | `{config}`{_mark(cells[name])} | " + " | ".join(row) + " |")
        if name.startswith("elpv"):
            lines += ["", "Image AUROC of the uncertain cells (each type against the good cells):", "",
                      "| regime | configuration | " + " | ".join(DEFECT_TYPES.values()) + " |", "|---|---|---|---|---|"]
            for regime in sorted(table, key=_regime_order):
                for config, cells in sorted(table[regime].items()):
                    if name in cells:
                        lines.append(f"| {regime} | `{config}` | " + " | ".join(
                            _cell(cells[name].get(f"auroc[{t}]")) for t in DEFECT_TYPES.values()) + " |")
        lines.append("")
    return "\n".join(lines)


def _threshold_section(table: dict, sets: list[str]) -> list[str]:
    """FPR / TPR at each detector's own normal-only threshold, full-shot, per set."""
    configs = table.get("full-shot", {})
    if not configs:
        return []
    lines = ["## The normal-only threshold, full-shot: FPR / TPR per set", "",
             "Each detector's own threshold (set from its normal training images alone): share of good test images "
             "flagged (FPR) / share of (certainly) defective ones flagged (TPR). **‡**: measured before calibration "
             "held out five folds (every normal image scored once); these runs held out one fifth, whose scores "
             "could not resolve the 1 % quantile, so their thresholds sit higher (re-run with --rerun). PatchCore's "
             "rows (every one) were measured while each held-out fold ran its own coreset; since 2026-11-30 evening "
             "the folds take their banks from the final coreset's continued greedy, which put the threshold slightly "
             "higher on BSData (FPR / TPR 0.067 / 0.898 → 0.056 / 0.874 at 4,096 rows, 300 training images: "
             "coreset_scale.md); AUROCs are unchanged (same final bank).", "",
             "| configuration | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for config, cells in sorted(configs.items()):
        row = []
        for name in sets:
            fpr, tpr = (cells.get(name, {}).get(metric) for metric in ("fpr", "tpr"))
            stale = " ‡" if cells.get(name, {}).get("one_fold") else ""
            row.append("–" if fpr is None or tpr is None else f"{fpr[0]:.3f} / {tpr[0]:.3f}{stale}")
        lines.append(f"| `{config}` | " + " | ".join(row) + " |")
    return lines + [""]


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="", help="comma list of methods with their default parameters")
    parser.add_argument("--config", action="append", default=[], metavar="METHOD[:KEY=VALUE,...]",
                        help="a method with parameters, repeatable (e.g. patchcore:bank_size=16384,size=320)")
    parser.add_argument("--sets", default=",".join((*REAL_SETS, *SANITY_SETS)),
                        help="comma list; gen-all: every generator category (results to generator_suite.json/md)")
    parser.add_argument("--shots", default="full", help="comma list of full and k; zero-shot methods run 0 instead")
    parser.add_argument("--seeds", type=int, default=1, help="k-shot runs use seeds 0..N-1; full-shot uses seed 0")
    parser.add_argument("--max-test", type=int, default=None,
                        help="evaluate on a fixed-seed stratified subset of at most N test images (marked in the report)")
    parser.add_argument("--json", default=None, help="default: real_suite.json (generator_suite.json for --sets gen-all)")
    parser.add_argument("--md", default=None, help="default: beside --json, .md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the Markdown from the JSON and stop")
    parser.add_argument("--rerun", action="store_true",
                        help="measure the named runs again and replace their cached results (after a change that moves them)")
    parser.add_argument("--no-memo", action="store_true",
                        help="embed every run's images afresh instead of keeping each set's features for the next "
                             "run: for tiled or high-resolution configurations, whose features would not fit twice in memory")
    args = parser.parse_args(argv)
    set_names = list(GENERATED_SETS) if args.sets == "gen-all" else [s for s in args.sets.split(",") if s]
    json_path = Path(args.json) if args.json else (GENERATED_RESULTS if args.sets == "gen-all" else RESULTS).with_suffix(".json")
    md_path = Path(args.md) if args.md else json_path.with_suffix(".md")
    if not args.report_only:
        configs = [parse_config(m) for m in args.methods.split(",") if m.strip()] + [parse_config(c) for c in args.config]
        unknown = [s for s in set_names if s not in SETS]
        if unknown:
            raise SystemExit(f"--sets: unknown {', '.join(unknown)}; available: {', '.join(SETS)}")
        shot_list = [s.strip() for s in args.shots.split(",") if s.strip()]
        for set_name in set_names:
            suite_set = SETS[set_name]
            dataset = test_subset(suite_set.load(), args.max_test)
            MEMO.clear()
            # Shot counts outermost, zero-shot methods last: cheap complete tables come first.
            plan = [(shots, method, params) for shots in shot_list for method, params in configs
                    if REGISTRY[method].learning_type != LearningType.ZERO_SHOT]
            plan += [("0", method, params) for method, params in configs if REGISTRY[method].learning_type == LearningType.ZERO_SHOT]
            for shots, method, params in plan:
                for seed in range(1 if shots in ("full", "0") else args.seeds):
                    key = run_key(config_name(method, params), set_name, shots, seed, args.max_test)
                    if key in load_runs(json_path) and not args.rerun:
                        continue
                    print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
                    try:
                        entry = measure(suite_set, dataset, method, params, shots, seed, args.max_test, memo=not args.no_memo)
                    except Exception as error:  # one failing run must not lose the others
                        print(f"  FAILED: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                        continue
                    save_run(json_path, key, entry)
                    print(f"  image AUROC {entry['image_auroc']:.3f}  FPR {entry['fpr']}  TPR {entry['tpr']}  "
                          f"wall {entry['wall_seconds']:.0f} s", flush=True)
    report = render(load_runs(json_path), md_path.with_name(md_path.stem + "_shots.png"))
    md_path.write_text(report, encoding="utf-8")
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
