"""How much each of composition's calibrated scores should count in its image score: a grid of
weights re-applied to the scores ``loco_types.py`` recorded, chosen on the mean over set groups
and checked leave-one-group-out.

    python benchmarks/composition_weights.py \
        --groups 'assembly 0-2=loco_types_autoviews.json:defaults,assembly 3-5=loco_types_placement_345.json,photo_assembly 0-2=loco_types_placement_photo.json' \
        --check '1 shot=loco_types_placement_shots1.json:v0,8 shots=loco_types_placement_shots8.json:v2' \
        --out composition_weights

Each file (under benchmarks/results unless a path) holds runs of one detector configuration
(``:CONFIG`` picks one where a file holds several) with every test image's calibrated scores. The
image score is the norm of the weighted scores, so re-weighting recorded scores gives what the
detector would score with those weights; the logical image AUROC of each run (logical anomalies
against the good test images) is averaged per group. The weights are chosen on the mean over
groups of each group's mean less its std over runs (shot draws and generator sets); each group is
then left out, the weights chosen on the others and read on it. The check
files (other shot counts) get the chosen weights against none, paired run by run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from defectlens.models.composition.model import SCORES, combine

RESULTS = Path(__file__).resolve().parent / "results"
#: Weights tried per score (the others stay 1): the two patch counts, whose spread over good trays
#: four held-out shots estimate worst (a draw's good trays held 5 to 11 patches out of place
#: against a held-out mean under one).
GRID = {"placement": (0.25, 0.5, 0.75, 1.0), "words": (1.0, 1.5, 2.0, 2.5, 3.0)}


def load_runs(spec: str) -> list[tuple[list[dict[str, float]], np.ndarray]]:
    """Per run: the calibrated scores of each good and logical test image, and which of them are
    logical anomalies."""
    name, _, config = spec.partition(":")
    path = Path(name) if Path(name).is_file() else RESULTS / name
    runs = [r for r in json.loads(path.read_text()) if not config or r["config"] == config]
    if not runs:
        raise SystemExit(f"{path}: no runs{f' of configuration {config!r}' if config else ''}")
    out = []
    for run in runs:
        types = np.array(run["types"])
        chosen = (types == "good") | np.array(run["logical"], bool)
        out.append(([image for image, kept in zip(run["seven"], chosen) if kept], types[chosen] != "good"))
    return out


def aurocs(runs, weights: dict[str, float]) -> np.ndarray:
    """Per run: the logical image AUROC of the detector's own image score (``combine``) with ``weights``."""
    return np.array([roc_auc_score(labels, [combine(image, SCORES, weights) for image in images])
                     for images, labels in runs])


def named_specs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def describe(weights: dict[str, float]) -> str:
    shown = {s: v for s, v in weights.items() if v != 1.0}
    return ", ".join(f"{s} {v:g}" for s, v in shown.items()) or "none"


def paired(new: np.ndarray, old: np.ndarray) -> str:
    d = new - old
    return (f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} ({(d > 1e-9).sum()} better, {(d < -1e-9).sum()} worse)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", required=True, help="NAME=FILE[:CONFIG],...: the set groups the weights are chosen on")
    parser.add_argument("--check", default="", help="NAME=FILE[:CONFIG],...: runs the chosen weights are read on")
    parser.add_argument("--out", default="composition_weights", help="results name under benchmarks/results")
    args = parser.parse_args()
    groups = {name: load_runs(spec) for name, spec in named_specs(args.groups).items()}
    grid = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    table = {i: {g: aurocs(runs, w) for g, runs in groups.items()} for i, w in enumerate(grid)}
    unweighted = {g: aurocs(runs, {}) for g, runs in groups.items()}

    def merit(result: dict[str, np.ndarray], over: list[str]) -> float:
        """The mean over groups of each group's mean less its std over runs: the target asks for
        a high logical AUROC and a small spread over shot draws, both."""
        return float(np.mean([result[g].mean() - result[g].std(ddof=1) for g in over]))

    def best(over: list[str]) -> int:
        return max(table, key=lambda i: merit(table[i], over))

    names = list(groups)
    chosen = best(names)
    lines = [f"# Composition's score weights: chosen on the mean over set groups, checked leave-one-group-out\n",
             f"`python benchmarks/composition_weights.py --groups '{args.groups}' --check '{args.check}' "
             f"--out {args.out}`, {time.strftime('%Y-%m-%d')}. Logical image AUROC (logical anomalies against "
             f"the good test images) per run of the recorded calibrated scores, re-weighted in the norm; mean ± "
             f"std over the runs of each group; ranked by the mean over groups of mean less std. Grid: {', '.join(f'{s} {list(v)}' for s, v in GRID.items())}, "
             f"every other score 1.\n",
             f"Chosen on all groups: **{describe(grid[chosen])}**.\n",
             "| weights | " + " | ".join(names) + " | mean | mean less std |", "|---|" + "---|" * (len(names) + 2)]
    ranked = sorted(table, key=lambda i: -merit(table[i], names))
    rows = [("none (every score 1)", unweighted)] + [(describe(grid[i]), table[i]) for i in ranked[:10]]
    for label, result in rows:
        lines.append(f"| {label} | " + " | ".join(f"{result[g].mean():.3f} ± {result[g].std(ddof=1):.3f}" for g in names)
                     + f" | {np.mean([result[g].mean() for g in names]):.3f} | {merit(result, names):.4f} |")
    lines += ["", "## Leave one group out\n", "| left out | weights chosen on the others | there | unweighted | paired |",
              "|---|---|---|---|---|"]
    for out in names:
        i = best([g for g in names if g != out])
        new, old = table[i][out], unweighted[out]
        lines.append(f"| {out} | {describe(grid[i])} | {new.mean():.3f} ± {new.std(ddof=1):.3f} | "
                     f"{old.mean():.3f} ± {old.std(ddof=1):.3f} | {paired(new, old)} |")
    checks = {name: load_runs(spec) for name, spec in named_specs(args.check).items()}
    if checks:
        lines += ["", f"## The chosen weights on other runs\n", "| runs | unweighted | weighted | paired |", "|---|---|---|---|"]
        for name, runs in checks.items():
            new, old = aurocs(runs, grid[chosen]), aurocs(runs, {})
            lines.append(f"| {name} ({len(runs)} runs) | {old.mean():.3f} ± {old.std(ddof=1):.3f} | "
                         f"{new.mean():.3f} ± {new.std(ddof=1):.3f} | {paired(new, old)} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
