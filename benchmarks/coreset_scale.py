"""PatchCore at scale: coreset time, exactness of its picks, fit time, and faiss search options.

    python benchmarks/coreset_scale.py [--images 300] [--size 256] [--repeats 3]
    python benchmarks/coreset_scale.py --fit-only [--bank 32768] [--coreset NAME]

--fit-only: issue 14's target alone: the whole PatchCore fit (embedding, calibration fold, final
  coreset and index) of ``--images`` BSData training images with a ``--bank``-row bank, timed by
  phase in wall and process CPU seconds (CPU time stays meaningful on a loaded machine when
  DEFECTLENS_THREADS=1), printed and appended to ``--fit-json`` when given. Run it alone on a
  quiet machine for the wall figure.

coreset: `greedy_coreset` as PatchCore calls it (all patches of N images, per-image pool first),
  banks of 4096 and 32768 rows, median of ``--repeats`` runs; against the one-pass-per-pick loop
  it replaces (timed in full at 4096, per pick on a prefix at 32768 and extrapolated).
exactness: the first picks of the plain loop vs the batched rounds on all projected patches.
fit: `create_detector("patchcore", bank_size=32768).fit(images)` end to end (backbone, held-out
  calibration fit, final fit).
search: flat vs IVF vs HNSW on the 32768-row bank and on a 131072-row bank of patches: build
  time, ms per image (1024 query patches), share of queries whose nearest distance is exact.
Writes benchmarks/results/coreset_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from defectlens.backbones import get_backbone
from defectlens.models import create_detector
from defectlens.models.memory import NearestNeighbours, _KCenter, greedy_coreset

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets" / "bsdata" / "ball_screw"


def plain_picks(points: torch.Tensor, first: int, picks: int) -> list[int]:
    """The loop the rounds replace: one matrix-vector pass over every point per pick."""
    norms = (points * points).sum(dim=1)
    nearest = torch.full((points.shape[0],), float("inf"))
    picked = [first]
    for step in range(picks):
        if step:
            picked.append(int(torch.argmax(nearest)))
        torch.minimum(nearest, norms - 2.0 * (points @ points[picked[-1]]) + norms[picked[-1]], out=nearest)
    return picked


def plain_coreset(projected: torch.Tensor, size: int, groups: int, global_picks: int) -> float:
    """Seconds the previous implementation takes for PatchCore's call: the per-image pools and
    then the global k-center, both with the plain loop (the global stage timed on its first
    ``global_picks`` picks and scaled to ``size``: every pick there costs one pass over the pool)."""
    count = projected.shape[0]
    started = time.perf_counter()
    keep = -(-4 * size // groups)
    pool = torch.cat([block[plain_picks(projected[block], 0, keep)] for block in torch.tensor_split(torch.arange(count), groups)])
    pool_s = time.perf_counter() - started
    started = time.perf_counter()
    plain_picks(projected[pool], 0, min(size, global_picks))
    return pool_s + (time.perf_counter() - started) * size / min(size, global_picks)


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-prefix", type=int, default=1000, help="plain-loop picks timed at 32768")
    parser.add_argument("--features", help="cache of the train features (.pt): read if present, else written")
    parser.add_argument("--no-fit", action="store_true", help="skip the end-to-end fit (it embeds the images again)")
    parser.add_argument("--out", default=str(HERE / "results" / "coreset_scale.md"))
    parser.add_argument("--fit-only", action="store_true", help="time the whole PatchCore fit only (see above)")
    parser.add_argument("--bank", type=int, default=32768, help="--fit-only: bank rows")
    parser.add_argument("--coreset", default=None, help="--fit-only: PatchCore's coreset parameter (default: its default)")
    parser.add_argument("--fit-json", help="--fit-only: append the timings to this JSON list")
    args = parser.parse_args()
    root = Path(args.data)
    train = sorted((root / "train" / "good").iterdir())[: args.images]
    if args.fit_only:
        time_fit(train, args)
        return
    test = sorted((root / "test").rglob("*.[jp][pn]g"))[:20]
    backbone = get_backbone("efficientnet-lite0", args.size)
    if args.features and Path(args.features).is_file():
        features = torch.load(args.features).float()[: len(train)]
    else:
        features = backbone.embed(train, progress="features")
        if args.features:
            torch.save(features.half(), args.features)
    patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).contiguous()
    lines = [f"# PatchCore at scale ({len(train)} BSData train images, {args.size} px, {patches.shape[0]} patches × {patches.shape[1]})", "",
             f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores given, "
             f"torch threads {torch.get_num_threads()}. The machine is shared with other agents (load average "
             f"{os.getloadavg()[0]:.0f} at the start): every time is an upper bound; medians of {args.repeats} runs.", ""]

    lines += ["## Coreset (PatchCore's call: per-image pool of 4 × bank, then the global k-center)", "",
              "| bank rows | batched rounds (s, median) | plain loop (s) | speed-up |", "|---|---|---|---|"]
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(patches.shape[1], 128, generator=generator) / 128**0.5
    projected = patches @ projection
    for bank in (4096, 32768):
        fast_s, _ = timed(lambda: greedy_coreset(patches, bank, groups=len(train)), args.repeats)
        plain_s = plain_coreset(projected, bank, len(train), bank if bank <= 4096 else args.plain_prefix)
        note = "" if bank <= 4096 else f" (global stage extrapolated from {args.plain_prefix} picks)"
        lines.append(f"| {bank} | {fast_s:.1f} | {plain_s:.1f}{note} | {plain_s / fast_s:.1f}× |")
        print(lines[-1], flush=True)

    prefix = min(args.plain_prefix, 2000)
    reference = plain_picks(projected, 0, prefix)
    batched = _KCenter(projected).run(0, prefix).tolist()
    same = next((i for i, (a, b) in enumerate(zip(reference, batched)) if a != b), prefix)
    lines += ["", f"Exactness on real features: on all {projected.shape[0]} projected patches, the first {prefix} picks of the "
              f"plain loop and of the batched rounds agree for the first {same} picks "
              f"({len(set(reference) & set(batched))} of {prefix} picks shared as sets; float32 rounding can swap near-ties).", ""]
    print(lines[-2], flush=True)

    if not args.no_fit:
        started = time.perf_counter()
        detector = create_detector("patchcore", size=args.size, bank_size=32768).fit(train)
        fit_s = time.perf_counter() - started
        lines += [f"PatchCore fit, bank 32768, {len(train)} images end to end (backbone + held-out calibration fit + final fit): "
                  f"**{fit_s:.1f} s** (one run). Before: 9.5 min (issue 14, 302 images).", ""]
        print(lines[-2], flush=True)
        bank32768 = detector.bank.numpy()
    else:
        bank32768 = patches[greedy_coreset(patches, 32768, groups=len(train))].numpy()

    queries = flatten(backbone.embed(test)).numpy()
    banks = {"32768 (coreset)": bank32768,
             "131072 (random patches)": patches[torch.randperm(patches.shape[0], generator=generator)[:131072]].numpy()}
    lines += ["## Nearest-neighbour search (20 BSData test images, 1024 patches each)", "",
              "| bank | index | build (s) | ms / image | exact nearest | worst overestimate |", "|---|---|---|---|---|---|"]
    for name, bank in banks.items():
        exact = None
        for kind in ("flat", "ivf", "hnsw"):
            started = time.perf_counter()
            index = NearestNeighbours(bank, index=kind)
            build_s = time.perf_counter() - started
            search_s, (distance, _) = timed(lambda: index.search(queries, k=1), args.repeats)
            if exact is None:
                exact = distance[:, 0]
            share = float(np.mean(np.isclose(distance[:, 0], exact, rtol=1e-4, atol=1e-5)))
            worst = float(np.max(distance[:, 0] / np.maximum(exact, 1e-6))) - 1.0
            lines.append(f"| {name} | {kind} | {build_s:.1f} | {search_s / len(test) * 1000:.1f} | {share:.3f} | {worst:.1%} |")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


class Clock:
    """Wall and process-CPU seconds of consecutive phases."""

    def __init__(self):
        self.phases: dict[str, tuple[float, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.phases[name] = (wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu


def time_fit(train: list[Path], args) -> None:
    """PatchCore's whole fit (what ``fit`` runs: embedding, then calibration folds and the final
    coreset), split into the embedding and the rest."""
    params = {"size": args.size, "bank_size": args.bank}
    if args.coreset:
        params["coreset"] = args.coreset
    detector = create_detector("patchcore", **params)
    detector.backbone_network  # built before the clock starts: loading weights is not fitting
    load = os.getloadavg()[0]
    clock = Clock()
    features = detector.embed_images(train, fit=True)
    clock.lap("embedding")
    detector.fit_from_features(features)
    clock.lap("calibration + final coreset + index")
    wall = sum(w for w, _ in clock.phases.values())
    cpu = sum(c for _, c in clock.phases.values())
    record = {"images": len(train), "size": args.size, "params": detector.get_params(), "bank_rows": int(detector.bank.shape[0]),
              "threads": torch.get_num_threads(), "load_average_start": load, "load_average_end": os.getloadavg()[0],
              "phases": {name: {"wall_s": w, "cpu_s": c} for name, (w, c) in clock.phases.items()},
              "fit_wall_s": wall, "fit_cpu_s": cpu, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print(json.dumps(record, indent=1), flush=True)
    if args.fit_json:
        path = Path(args.fit_json)
        runs = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(runs + [record], indent=1) + "\n")


def flatten(features: torch.Tensor) -> torch.Tensor:
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


if __name__ == "__main__":
    main()
