"""How composition combines its own image score with a fused structural member's: fusion rules
compared on the same fitted models, paired run by run.

    python benchmarks/composition_fusion.py [--categories assembly,photo_assembly] [--loco-seeds 0,1,2]
        [--seeds 5] [--member '{"size": 512, "top_fraction": 0.003}']

For each generated LOCO set (``defectlens generate --kind loco``, trays at 256 px, 16 train, 16 good
and 4 of each anomaly type per test set: the sets of loco_fewshot_structural.md) and each shot
draw, composition with views=2, normalise=pooled and the structural member is fitted on 4 shots
and scores the test set. Its fusion step is observed, not changed: the two detectors' raw scores of
the held-out shots (which standardise them) and of the test images are recorded, so every rule is
evaluated on the same numbers. Rules: ``max`` of the two z-scores with the spread floored at 2 %,
10 %, 15 % or 20 % of the held-out mean (2 % was composition's rule until 2026-12-03), ``max`` of
each score over its held-out mean, ``softmax`` log(e^a + e^b), ``mean``, and ``max`` of robust
z-scores (median and MAD). Image AUROC of logical, of structural and of all anomalies against the
good test images, mean ± std over runs, and each rule's paired difference from the 2 % rule (mean ±
standard error, and per set).

Raw scores go to benchmarks/results/composition_fusion.json (resumed), the tables to
composition_fusion.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from defectlens.data.datasets import load_dataset
from defectlens.data.generator import generate
from defectlens.data.io import read_image
from defectlens.engine.fit import training_set
from defectlens.models import LearningType, create_detector
from defectlens.models.composition.model import Composition, spread

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parent.parent / "shared" / "datasets"
SHOTS = 4


def loco_set_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming the few-shot LOCO sets (``fewshot_loco_set``) and the shot draws."""
    parser.add_argument("--categories", default="assembly", help="LOCO categories: assembly, photo_assembly")
    parser.add_argument("--loco-seeds", default="0,1,2")
    parser.add_argument("--seeds", type=int, default=5, help="shot draws per set")
    parser.add_argument("--photos", default=str(PHOTOS))
    parser.add_argument("--work", default="/tmp/defectlens-fusion")


def fewshot_loco_set(work: Path, category: str, loco_seed: int, photos: str):
    """The generated LOCO set of few-shot runs (trays at 256 px, 16 train, 16 good and 4 of each
    anomaly type in test), written under ``work`` when missing."""
    folder = work / f"{category}-{loco_seed}"
    if not (folder / category).is_dir():
        generate(folder, kind="loco", seed=loco_seed, categories=[category], photos=photos, size=256,
                 n_train=16, n_test_good=16, n_test_defect_per_type=4)
    return load_dataset(folder / category)


def standardised(run: dict, floor: float = 0.02, robust: bool = False, centred: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The two detectors' test scores against their own held-out normal scores: less the centre
    (mean, or median when ``robust``) unless not ``centred``, over the spread (the detector's
    ``spread``, or 1.4826 MAD), floored at ``floor`` times the centre; not centred and floor 1: each
    score over its held-out mean."""
    out = []
    for held, test in ((run["held_comp"], run["test_comp"]), (run["held_member"], run["test_member"])):
        held, test = np.asarray(held), np.asarray(test)
        if robust:
            centre = float(np.median(held))
            deviation = max(1.4826 * float(np.median(np.abs(held - centre))), floor * abs(centre), 1e-9)
        else:
            centre, deviation = float(np.mean(held)), spread(held, floor)
        out.append((test - centre * centred) / deviation)
    return out[0], out[1]


#: The rule composition used until 2026-12-03 (``max`` of z-scores, spread at least 2 % of the
#: mean): the others are paired against it.
BASE = "max, floor 2 %"
RULES = {
    BASE: lambda run: np.maximum(*standardised(run)),
    "max, floor 10 %": lambda run: np.maximum(*standardised(run, floor=0.1)),
    "max, floor 15 %": lambda run: np.maximum(*standardised(run, floor=0.15)),
    "max, floor 20 %": lambda run: np.maximum(*standardised(run, floor=0.2)),
    "max of ratios to the held-out mean": lambda run: np.maximum(*standardised(run, floor=1.0, centred=False)),
    "softmax": lambda run: np.logaddexp(*standardised(run)),
    "mean": lambda run: np.mean(standardised(run), axis=0),
    "robust max": lambda run: np.maximum(*standardised(run, robust=True)),
}
GROUPS = ("logical", "structural", "all")


def aurocs(run: dict, scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of each kind of anomaly, and of all of them, against the good test images."""
    groups = np.asarray(run["groups"])
    result = {}
    for group in GROUPS:
        keep = (groups == "good") | (groups == group) if group != "all" else np.ones(len(groups), bool)
        result[group] = float(roc_auc_score(groups[keep] != "good", np.asarray(scores)[keep]))
    return result


def collect(args, store: list[dict], save) -> None:
    """Fit and score every (set, draw) not yet in ``store``, recording the fusion's inputs."""
    observed = []
    fuse = Composition._fuse

    def observing(detector, scores, member_scores):  # the rule's inputs, then the rule itself
        observed.append((np.asarray(scores, float).tolist(), np.asarray(member_scores, float).tolist()))
        return fuse(detector, scores, member_scores)

    Composition._fuse = observing
    member = json.loads(args.member)
    done = {(r["category"], r["set"], r["seed"]) for r in store if r["member"] == member}
    for category in args.categories.split(","):
        for loco_seed in (int(s) for s in args.loco_seeds.split(",")):
            dataset = fewshot_loco_set(Path(args.work), category, loco_seed, args.photos)
            images = [read_image(sample.path) for sample in dataset.test]
            groups = ["logical" if s.logical else "structural" if s.label == 1 else "good" for s in dataset.test]
            for seed in range(args.seeds):
                if (category, loco_seed, seed) in done:
                    continue
                observed.clear()
                started = time.perf_counter()
                shots = training_set(dataset, LearningType.NORMAL, SHOTS, seed).images
                detector = create_detector("composition", seed=seed, size=256, views=2, normalise="pooled",
                                           structural="patchknn", structural_params=member).fit(shots)
                detector.predict(images, maps=False)
                (held_comp, held_member), (test_comp, test_member) = observed[0], observed[-1]
                store.append({"category": category, "set": loco_seed, "seed": seed, "member": member,
                              "held_comp": held_comp, "held_member": held_member, "test_comp": test_comp,
                              "test_member": test_member, "groups": groups})
                save()
                print(f"{category}-{loco_seed} draw {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    Composition._fuse = fuse


def tables(store: list[dict], member: dict) -> str:
    lines = []
    for category in sorted({r["category"] for r in store if r["member"] == member}):
        runs = [r for r in store if r["member"] == member and r["category"] == category]
        sets = sorted({r["set"] for r in runs})
        results = {name: [aurocs(run, rule(run)) for run in runs] for name, rule in RULES.items()}
        lines += [f"## {category}: {len(runs)} runs ({len(sets)} sets × draws)", "",
                  "| rule | logical AUROC | structural AUROC | all AUROC | logical − base | structural − base | all − base "
                  "| per set (logical / structural − base) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, result in results.items():
            cells = [name]
            for group in GROUPS:
                values = np.array([x[group] for x in result])
                cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}")
            per_set = []
            for group in GROUPS:
                differences = np.array([x[group] - b[group] for x, b in zip(result, results[BASE])])
                cells.append("" if name == BASE else f"{differences.mean():+.3f} ± {differences.std(ddof=1) / np.sqrt(len(differences)):.3f}")
            for s in sets:
                pairs = [(x, b) for x, b, r in zip(result, results[BASE], runs) if r["set"] == s]
                per_set.append(" / ".join(f"{np.mean([x[g] - b[g] for x, b in pairs]):+.3f}" for g in ("logical", "structural")))
            cells.append("" if name == BASE else "; ".join(per_set))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    loco_set_arguments(parser)
    parser.add_argument("--member", default='{"size": 512, "top_fraction": 0.003}', help="structural_params (JSON)")
    parser.add_argument("--out", default=str(HERE / "results" / "composition_fusion"))
    args = parser.parse_args()
    out = Path(args.out)
    store = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else []

    def save() -> None:
        out.with_suffix(".json").write_text(json.dumps(store))

    collect(args, store, save)
    member = json.loads(args.member)
    text = (f"# Composition's fusion with a structural member: rules compared on the same runs\n\n"
            f"`python benchmarks/composition_fusion.py --categories {args.categories} --loco-seeds {args.loco_seeds} "
            f"--seeds {args.seeds} --member '{args.member}'`, {time.strftime('%Y-%m-%d')}. Composition at {SHOTS} shots, "
            "size=256, views=2, normalise=pooled, structural=patchknn with the member's parameters above; trays at "
            "256 px, 16 good and 4 of each anomaly type per test set. AUROC mean ± std over runs; differences from "
            f"`{BASE}` (the rule until 2026-12-03) paired run by run (mean ± standard error), then per generator set. "
            "The tables count every run of this member stored in the JSON, also those of earlier invocations.\n\n" + tables(store, member))
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
