"""PatchCore's AUROC with each coreset algorithm on the real sets, on the same features.

    python benchmarks/coreset_quality.py --sets bsdata,deeppcb --bank 32768 --coresets greedy,cells \
        --cache /tmp/coreset_quality --json benchmarks/results/coreset_quality.json

Per set: the training and test images are embedded once (cached under ``--cache``); for each
coreset algorithm PatchCore's final bank is built from all training patches exactly as
``PatchCore.fit_features`` does (``coreset=`` parameter, default parameters otherwise), the test
images are scored, and image AUROC and pixel AUROC (maps at the 256-px input, masks resized to
it) are recorded with the coreset's seconds and how well it covers the training patches (mean and
largest distance from 16384 of them, a fixed random sample, to their nearest bank row). Calibration does not change
AUROC, so it is skipped: the comparison isolates the coreset. Picks are cached too, so a slow
algorithm (the exact greedy) runs once and its result can be compared with later ones.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from defectlens.data.datasets import load_dataset
from defectlens.data.io import as_mask
from defectlens.metrics import image_auroc, pixel_auroc
from defectlens.models import create_detector
from defectlens.models.memory import NearestNeighbours
from defectlens.models.patchcore.model import flatten_patches

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("DEFECTLENS_SHARED", HERE.parents[1] / "shared")) / "datasets"
SETS = {"bsdata": SHARED / "bsdata" / "ball_screw", "deeppcb": SHARED / "deeppcb" / "pcb"}


def cached_features(detector, name: str, paths: list, cache: Path) -> torch.Tensor:
    file = cache / f"{name}.pt"
    if file.is_file():
        return torch.load(file)
    features = detector.embed_images([str(p) for p in paths], fit=True, progress=name, total=len(paths))
    torch.save(features, file)
    return features


def coverage(patches: torch.Tensor, bank: torch.Tensor, sample: int = 16384) -> tuple[float, float]:
    """Mean and largest distance from a fixed random sample of training patches to the bank."""
    chosen = torch.randperm(patches.shape[0], generator=torch.Generator().manual_seed(0))[:sample]
    distances, _ = NearestNeighbours(bank.numpy()).search(patches[chosen].numpy(), k=1)
    return float(distances.mean()), float(distances.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="bsdata,deeppcb")
    parser.add_argument("--bank", type=int, default=32768)
    parser.add_argument("--coresets", default="greedy", help="comma list of PatchCore coreset= values")
    parser.add_argument("--cache", default="/tmp/coreset_quality")
    parser.add_argument("--json", default=str(HERE / "results" / "coreset_quality.json"))
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.json)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for set_name in args.sets.split(","):
        dataset = load_dataset(SETS[set_name])
        probe = create_detector("patchcore")
        train = cached_features(probe, f"{set_name}-train", [s.path for s in dataset.train], cache)
        test = cached_features(probe, f"{set_name}-test", [s.path for s in dataset.test], cache)
        labels = np.array([s.label for s in dataset.test])
        masks = [as_mask([str(p) for p in s.mask_paths] or None, (256, 256)) for s in dataset.test]
        patches = flatten_patches(train).contiguous()
        for method in args.coresets.split(","):
            key = f"{set_name}|bank{args.bank}|{method}"
            picks_file = cache / f"{key.replace('|', '-')}.pt"
            detector = create_detector("patchcore", bank_size=args.bank, coreset=method)
            if picks_file.is_file():
                saved = torch.load(picks_file)
                detector._set_bank(saved["bank"])
                seconds = saved["seconds"]
            else:
                started = time.perf_counter()
                detector.fit_features(train)
                seconds = time.perf_counter() - started
                torch.save({"bank": detector.bank, "seconds": seconds}, picks_file)
            scores, patch_maps = detector.score_feature_batch(test)
            maps = [detector.upsample_map(m.numpy(), (256, 256)) for m in patch_maps]
            entry = {"set": set_name, "bank": args.bank, "coreset": method, "train_images": int(train.shape[0]),
                     "train_patches": int(patches.shape[0]), "bank_rows": int(detector.bank.shape[0]),
                     "image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps),
                     "coreset_seconds": seconds, "sample_coverage_mean_max": coverage(patches, detector.bank),
                     "load_average": os.getloadavg()[0]}
            results[key] = entry
            out.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(entry), flush=True)


if __name__ == "__main__":
    main()
