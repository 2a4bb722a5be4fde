"""Peak memory of `defectlens predict` on very large images, as a user meets them.

    python benchmarks/huge_images.py [--work /tmp/huge] [--out benchmarks/results/huge_images.md]

Writes a few large PNGs (flat grey with a scratch: a 20000² one is about 1 MB on disk), fits a
tiny patchcore model, then runs the CLI once per case in a fresh process and reads that process's
own peak RSS (os.wait4). Cases: a normal-sized image (the baseline: Python, torch, the model), a
144 Mpx RGB image under the decoding limit (decoded, then scored and mapped at 4096 px), a 400 Mpx
image refused by the default limit, and the same image admitted with --max-megapixels 500.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def make_png(path: Path, side: int, mode: str) -> None:
    image = Image.new(mode, (side, side), 128 if mode == "L" else (128, 120, 110))
    ImageDraw.Draw(image).line([(side // 4, side // 3), (side // 2, side // 2)], fill=255 if mode == "L" else (250, 250, 250),
                               width=max(1, side // 500))
    image.save(path, optimize=True)


def run(args: list[str]) -> tuple[int, float, float]:
    """Exit status, peak RSS in MB and seconds of one CLI run in its own process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "defectlens.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stderr.close()
    return process.returncode, usage.ru_maxrss / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=str(HERE / "results" / "huge_images.md"))
    parser.add_argument("--make", nargs=3, metavar=("SIDE", "MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_png(Path(args.make[2]), int(args.make[0]), args.make[1])
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="defectlens-huge-"))
    work.mkdir(parents=True, exist_ok=True)

    train = work / "train"
    train.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(100, 140, (256, 256, 3), dtype=np.uint8)).save(train / f"{i}.png")
    model = work / "m.dlmodel"
    status, _, _ = run(["fit", str(train), "-o", str(model), "--size", "128", "--overwrite"])
    assert status == 0, "fit failed"

    cases = [("1000² RGB (baseline)", 1000, "RGB", []),
             ("12000² RGB, 144 Mpx", 12000, "RGB", []),
             ("20000² gray, 400 Mpx, default limit", 20000, "L", []),
             ("20000² gray, 400 Mpx, --max-megapixels 500", 20000, "L", ["--max-megapixels", "500"])]
    lines = ["# Peak memory of `defectlens predict` on huge images", "",
             f"`python benchmarks/huge_images.py` on {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores shared with other jobs (times are upper bounds). Model: patchcore at 128 px. "
             "Peak RSS is the predict process's own high-water mark (os.wait4).", "",
             "| input | PNG size | exit | row | peak RSS | map file | seconds |", "|---|---|---|---|---|---|---|"]
    for name, side, mode, extra in cases:
        image = work / f"{side}_{mode}.png"
        if not image.exists():
            # In a child process: memory the parent holds at fork time would count in the next child's peak.
            subprocess.run([sys.executable, __file__, "--make", str(side), mode, str(image)], check=True)
        out_csv, maps = work / "out.csv", work / "maps"
        status, rss, seconds = run(["predict", str(model), str(image), "--csv", str(out_csv), "--maps", str(maps),
                                    "--overwrite", *extra])
        with open(out_csv, newline="", encoding="utf-8") as handle:
            (row,) = list(csv.DictReader(handle))
        if row["map"]:
            shape = np.load(row["map"], mmap_mode="r").shape
            map_text = f"{shape[0]}×{shape[1]}, {os.path.getsize(row['map']) / 2**20:.0f} MiB"
        else:
            map_text = "none"
        outcome = f"score {row['score']}" if row["score"] else f"refused: {row['error'].split(': ', 1)[1][:60]}…"
        lines.append(f"| {name} | {image.stat().st_size / 2**20:.1f} MiB | {status} | {outcome} | {rss:.0f} MB | "
                     f"{map_text} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", "Before this change (issue 10): the 20000² PNG took 5.9 GB and wrote a 1.6 GB map."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
