"""Throughput of `defectlens predict --dask local:N` against the single process, same images.

    python benchmarks/dask_scale.py [--train 60] [--test 300] [--workers 1,2] [--repeats 3]

Fits the default detector on --train BSData train images (once), then times whole
`defectlens predict MODEL TEST --csv` processes: single process, and `--dask local:N` for each N
(a LocalCluster started and closed inside the process, as a user gets it), --repeats times each,
in rotation so drifting machine load hits every variant alike. Reported: median wall seconds,
images/s, and the Dask overhead per image against the single process
((median_dask - median_single) / images). Every variant's CSV must hold the same rows and labels; scores are compared to float rounding.
Writes benchmarks/results/dask_scale.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets" / "bsdata" / "ball_screw"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "defectlens.cli", *args]


def rows(path: Path) -> dict[str, tuple[float, str]]:
    with path.open(newline="") as handle:
        return {row["path"]: (float(row["score"]), row["label"]) for row in csv.DictReader(handle)}


def agreement(content: dict, reference: dict) -> tuple[bool, float]:
    """(same paths and labels, largest relative score difference). Workers run 1 thread each and
    the single process 2, so BLAS sums in another order: scores agree to float32 rounding."""
    if content.keys() != reference.keys():
        return False, float("inf")
    labels = all(content[p][1] == reference[p][1] for p in reference)
    scale = max(abs(score) for score, _ in reference.values()) or 1.0
    return labels, max(abs(content[p][0] - reference[p][0]) for p in reference) / scale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtime", default="torch", help="backbone runtime in every variant (torch: no export step)")
    parser.add_argument("--out", default=str(HERE / "results" / "dask_scale.md"))
    args = parser.parse_args()
    root = Path(args.data)
    train = sorted((root / "train" / "good").iterdir())[: args.train]
    test = sorted(p for p in (root / "test").rglob("*") if p.suffix.lower() in (".png", ".jpg"))[: args.test]
    variants = {"single process": []} | {f"--dask local:{n}": ["--dask", f"local:{n}"] for n in args.workers.split(",")}

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "train").mkdir()
        for path in train:
            (work / "train" / path.name).symlink_to(path)
        (work / "test").mkdir()
        for index, path in enumerate(test):
            (work / "test" / f"{index:05d}{path.suffix}").symlink_to(path)
        model = work / "model.dlmodel"
        env = dict(os.environ, DEFECTLENS_CACHE=str(work / "cache"))
        subprocess.run(cli("fit", str(work / "train"), "-o", str(model)), check=True, env=env, capture_output=True)

        seconds: dict[str, list[float]] = {name: [] for name in variants}
        contents: dict[str, dict] = {}
        for repeat in range(args.repeats):
            for name, extra in variants.items():
                out = work / f"{abs(hash(name))}-{repeat}.csv"
                started = time.perf_counter()
                subprocess.run(cli("predict", str(model), str(work / "test"), "--csv", str(out),
                                   "--runtime", args.runtime, *extra), check=True, env=env, capture_output=True)
                seconds[name].append(time.perf_counter() - started)
                contents[name] = rows(out)
                print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)

    reference = contents["single process"]
    same = {name: agreement(content, reference) for name, content in contents.items()}
    single = statistics.median(seconds["single process"])
    lines = [
        "# Dask scale-out: whole `defectlens predict` processes, single vs LocalCluster",
        "",
        f"`python benchmarks/dask_scale.py --train {args.train} --test {args.test} --workers {args.workers} "
        f"--repeats {args.repeats} --runtime {args.runtime}` on {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{len(test)} BSData test images (1130×460 JPEG), default detector, CSV only. Medians of {args.repeats} "
        "runs, variants run in rotation. The whole process counts: start, model load, the cluster's start and "
        "close, decode, forward, scoring, CSV.",
        "",
        "| variant | median s | min–max s | images/s | overhead vs single (ms/img) | same rows and labels | largest score difference (relative) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, times in seconds.items():
        median = statistics.median(times)
        overhead = "–" if name == "single process" else f"{(median - single) / len(test) * 1000:+.1f}"
        lines.append(f"| {name} | {median:.1f} | {min(times):.1f}–{max(times):.1f} | {len(test) / median:.1f} | "
                     f"{overhead} | {'yes' if same[name][0] else 'NO'} | {same[name][1]:.1e} |")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    if not all(labels for labels, _ in same.values()):
        raise SystemExit("a Dask run's CSV rows or labels differ from the single process's")


if __name__ == "__main__":
    main()
