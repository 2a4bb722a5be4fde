"""Contact sheet and generation speed of `defectlens synthesize` on BSData and generator data.

    python benchmarks/synthesis_sheet.py [--work DIR] [-n 24]

Runs the CLI for every kind on the real BSData ball-screw set (when present) and on the
generator's washer and fabric, times each run (end to end: loading, GrabCut, blending, PNG
writing), then opens the written images and masks to draw docs/images/synthesis_contact_sheet.png
and writes benchmarks/results/synthesis_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from defectlens.cli import main as cli
from defectlens.data.io import read_image, read_mask
from defectlens.data.generator import generate

ROOT = Path(__file__).resolve().parents[1]
BSDATA = ROOT.parent / "shared" / "datasets" / "bsdata" / "ball_screw"
# perlin keeps its blobs on the GrabCut foreground, so the washer's belt stays clean
KINDS = {"perlin": ["--param", "on_foreground=true"], "cutpaste": [], "anogen": []}
SHOWN = 3  # examples per row
HEIGHT = 150  # px of each tile


def _tile(path: Path, size: int, draw: np.ndarray | None = None) -> np.ndarray:
    return cv2.resize(read_image(path) if draw is None else draw, (size, size), interpolation=cv2.INTER_AREA)


def _example(folder: Path, item: dict) -> np.ndarray:
    """Whole image with the box, a zoom around the box, and the same zoom with the mask outlined."""
    image, mask = read_image(folder / item["image"]), read_mask(folder / item["mask"])
    h, w = image.shape[:2]
    x0, y0, x1, y1 = item["box"] or (0, 0, w, h)
    whole = image.copy()
    thickness = max(1, round(max(h, w) / 300))
    cv2.rectangle(whole, (x0 - thickness, y0 - thickness), (x1 + thickness - 1, y1 + thickness - 1), (0, 255, 0), thickness)
    whole = cv2.resize(whole, (round(w * HEIGHT / h), HEIGHT), interpolation=cv2.INTER_AREA)
    side = min(max(int(2.5 * max(x1 - x0, y1 - y0)), 48), h, w)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    zx, zy = int(np.clip(cx - side // 2, 0, w - side)), int(np.clip(cy - side // 2, 0, h - side))
    zoom = cv2.resize(image[zy:zy + side, zx:zx + side], (HEIGHT, HEIGHT), interpolation=cv2.INTER_NEAREST if side < HEIGHT else cv2.INTER_AREA)
    outline = zoom.copy()
    zmask = cv2.resize(mask[zy:zy + side, zx:zx + side].astype(np.uint8), (HEIGHT, HEIGHT), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(zmask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(outline, contours, -1, (255, 40, 40), 1)
    gap = np.full((HEIGHT, 4, 3), 255, np.uint8)
    return np.concatenate([whole, gap, zoom, gap, outline], axis=1)


def _row(label: str, folder: Path) -> np.ndarray:
    items = json.loads((folder / "synthesis.json").read_text())["items"][:SHOWN]
    tiles = []
    for item in items:
        tiles += [_example(folder, item), np.full((HEIGHT, 12, 3), 255, np.uint8)]
    row = np.concatenate(tiles, axis=1)
    caption = np.full((22, row.shape[1], 3), 255, np.uint8)
    cv2.putText(caption, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([caption, row, np.full((8, row.shape[1], 3), 255, np.uint8)], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/defectlens-synthesis", help="scratch folder for data and outputs")
    parser.add_argument("-n", type=int, default=24, help="images per run")
    parser.add_argument("--sheet", default=str(ROOT / "docs" / "images" / "synthesis_contact_sheet.png"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "synthesis_speed.md"))
    args = parser.parse_args()
    work = Path(args.work)
    generate(work / "generator", kind="mvtec", seed=0, size=256, categories=["washer", "fabric"], overwrite=True)
    sources = {"washer (generator)": work / "generator" / "washer", "fabric (generator)": work / "generator" / "fabric"}
    if BSDATA.is_dir():
        sources = {"BSData ball_screw": BSDATA, **sources}
    import defectlens.models  # noqa: F401  (the CLI imports every detector: keep that out of the timings)

    rows, lines = [], []
    for name, data in sources.items():
        for kind, extra in KINDS.items():
            out = work / f"{data.name}_{kind}"
            started = time.perf_counter()
            if cli(["synthesize", str(data), str(out), "--kind", kind, "-n", str(args.n), "--seed", "0", "--overwrite", *extra]):
                raise SystemExit(f"synthesize {kind} on {data} failed")
            seconds = time.perf_counter() - started
            size = read_image(out / "images" / "0000.png").shape
            lines.append(f"| {name} | {size[1]}×{size[0]} | {kind} | {args.n} | {seconds:.1f} | {args.n / seconds:.2f} |")
            rows.append(_row(f"{name}: --kind {kind} {' '.join(extra)}   (whole image with box | zoom | zoom with mask outline)", out))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
    # 256 colours with dithering: a fifth of the bytes, no visible loss at this scale
    Image.fromarray(sheet).quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(args.sheet, optimize=True)
    table = "\n".join(["| data | image size | kind | images | seconds | images/s |", "|---|---|---|---|---|---|", *lines])
    Path(args.results).write_text(
        f"# Synthesis speed\n\n`python benchmarks/synthesis_sheet.py -n {args.n}` on {os.cpu_count()} CPU cores shared with other work, so the\n"
        "timings are noisy. Each run is one `defectlens synthesize` call (perlin with --param on_foreground=true),\n"
        "end to end except Python imports: loading the dataset, reading the anomaly examples (anogen), GrabCut\n"
        f"per normal image (anogen, perlin), synthesis and PNG writing.\n\n{table}\n", encoding="utf-8")
    print(table)
    print(f"sheet: {args.sheet}")


if __name__ == "__main__":
    main()
