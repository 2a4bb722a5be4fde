"""Contact sheet of the dataset generator's MVTec-layout categories.

    python benchmarks/generator_sheet.py [--size 256] [--tile 160] [--seed 0]

One row per category: two normal images (to show how normal images vary) and one image of each
structural defect with its mask outlined in red, all rendered by ``render_pair`` exactly as
``defectlens generate`` writes them. Saves docs/images/generator_categories.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from defectlens.data.generator import MVTEC_CATEGORIES, STRUCTURAL_DEFECTS, render_pair

ROOT = Path(__file__).resolve().parents[1]
LABEL_W = 110  # px of the category name column


def _tile(image: np.ndarray, tile: int, mask: np.ndarray | None = None) -> np.ndarray:
    out = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
    if mask is not None:
        small = cv2.resize(mask.astype(np.uint8), (tile, tile), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(cv2.dilate(small, np.ones((5, 5), np.uint8)), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 30, 30), 1)
    return out


def _text(width: int, height: int, text: str) -> np.ndarray:
    panel = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(panel, text, (4, height // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return panel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="rendered image size")
    parser.add_argument("--tile", type=int, default=160, help="shown tile size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "generator_categories.png"))
    args = parser.parse_args()
    gap = np.full((args.tile, 4, 3), 255, np.uint8)
    header = [_text(LABEL_W, 24, "")]
    for name in ("normal 0", "normal 1", *STRUCTURAL_DEFECTS):
        header += [_text(args.tile, 24, name), np.full((24, 4, 3), 255, np.uint8)]
    rows = [np.concatenate(header, axis=1)]
    for category in MVTEC_CATEGORIES:
        tiles = [_text(LABEL_W, args.tile, category)]
        for index in (0, 1):  # the clean twins of two defect images are normal images of the category
            clean, _, _ = render_pair(category, STRUCTURAL_DEFECTS[0], seed=args.seed, index=index, size=args.size)
            tiles += [_tile(clean, args.tile), gap]
        for defect in STRUCTURAL_DEFECTS:
            _, defective, mask = render_pair(category, defect, seed=args.seed, index=0, size=args.size)
            tiles += [_tile(defective, args.tile, mask), gap]
        rows += [np.concatenate(tiles, axis=1), np.full((4, rows[0].shape[1], 3), 255, np.uint8)]
    sheet = np.concatenate(rows, axis=0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # 256 colours with dithering: a fraction of the bytes, no visible loss at this scale
    Image.fromarray(sheet).quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(args.out, optimize=True)
    print(f"sheet: {args.out} ({sheet.shape[1]}x{sheet.shape[0]})")


if __name__ == "__main__":
    main()
