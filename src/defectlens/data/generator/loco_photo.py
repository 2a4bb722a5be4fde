"""The photo LOCO category: the assembly tray's rules, with every surface cut out of real photos.

Parts and backgrounds are textured with real pixels (see :mod:`.photos`): metal rods and a washer
cut from BSData ball-screw photos, a solar cell from an ELPV electroluminescence image, two
circuit-board chips from DeepPCB scans, the tray floor and the bench from other metal photos.
Each part takes its own photo and crop, so no two normal scenes share textures: tuning meets real
texture variation, not the generator's noise fields. Shapes, placement and the rules stay
geometric, so every mask comes from the geometry that altered the pixels.

Rules (compartments read left to right, top row first): two metal rods; one metal washer; one
solar cell; one green chip; one amber chip (green left of amber); the last compartment empty.
Logical anomalies are the assembly's five. Structural ones are real defects or foreign matter in
the same scenes: a rod cut from a BSData photo with a real pit (the pit marked), a cell replaced by
a real cracked ELPV cell (the cell marked: ELPV has no pixel masks), and contamination.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np

from .loco import _SLOT_H, _SLOT_W, _SLOTS, LOGICAL_DEFECTS, _contamination, _paste_part, _Pose, _slot_polygon, _Tray
from .photos import CELL_SIZE, PhotoPools
from .render import Rendering, Win, circle, dilate, drop_shadow, lighting, polygon_alpha, rect, streams

PHOTO_CATEGORY = "photo_assembly"
PHOTO_STRUCTURAL_DEFECTS = ("pitted_rod", "cracked_cell", "contamination")
PHOTO_CONFIG = (  # name, pixel value, saturation threshold, relative?
    ("missing_part", 255, 0.15, True), ("extra_part", 254, 1.0, True), ("swapped_parts", 253, 1.0, True),
    ("misplaced_part", 252, 1.0, True), ("wrong_color", 251, 1.0, True), ("pitted_rod", 250, 1.0, True),
    ("cracked_cell", 249, 1.0, True), ("contamination", 248, 60, False),
)
RULES = ("Rules of a normal tray (2x3 compartments, read left to right, top row first): two metal rods;\n"
         "one metal washer; one solar cell; one green chip; one amber chip (green left of amber); the last\n"
         "compartment empty. Every surface is cut from a real photo (BSData metal, ELPV cells, DeepPCB boards).\n"
         "Structural anomalies: a rod with a real BSData pit (the pit marked), a real cracked ELPV cell (the\n"
         "whole cell marked), a contamination.\n")

# Half extents in tray units (rods and chips: half length and half width; washer: radii).
_ROD = (0.10, 0.024)
_WASHER, _WASHER_HOLE = 0.068, 0.028
_CELL = 0.095
_CHIP = 0.07
#: Source pixels per tray unit, per texture pool: sets the real size of what is cut out.
_SOURCE_SCALE = {"metal": 250.0, "pits": 250.0, "pcb": 1000.0, "cells": CELL_SIZE / (2 * _CELL), "cracked": CELL_SIZE / (2 * _CELL)}
_TINTS = {  # (dark, light) RGB a grey source maps between; metal keeps the photo's own colour
    "blue_cell": ((0.03, 0.05, 0.16), (0.45, 0.55, 0.95)), "purple_cell": ((0.12, 0.03, 0.14), (0.85, 0.50, 0.90)),
    # board scans are mostly bare board (light) with copper (dark): the board takes the mask colour
    "green_chip": ((0.80, 0.55, 0.25), (0.10, 0.45, 0.18)), "amber_chip": ((0.80, 0.55, 0.25), (0.82, 0.55, 0.08)),
    "red_chip": ((0.80, 0.55, 0.25), (0.65, 0.10, 0.10)), "blue_chip": ((0.80, 0.55, 0.25), (0.10, 0.20, 0.62)),
}
_POOL_OF = {"rod": "metal", "washer": "metal", "cell": "cells", "chip": "pcb"}
# indices of the parts in a normal tray's part list (see _normal_parts)
_ROD_A, _ROD_B, _WASHER_I, _CELL_I, _GREEN, _AMBER = range(6)


@dataclass(frozen=True)
class _Part:
    kind: str  # rod | washer | cell | chip
    colour: str  # "metal" (the photo's own), "blued" (metal), or a key of _TINTS
    slot: int
    pos: tuple[float, float]  # centre, tray units
    angle: float  # radians, tray frame
    pool: str  # which photo pool textures it
    source: int  # photo index in that pool
    origin: tuple[float, float]  # the photo pixel at the part's centre


def _reach(kind: str) -> float:
    return {"rod": float(np.hypot(*_ROD)), "washer": _WASHER, "cell": _CELL * np.sqrt(2), "chip": _CHIP * np.sqrt(2)}[kind]


def _texture(rng: np.random.Generator, photos: PhotoPools, pool: str, kind: str) -> tuple[int, tuple[float, float]]:
    """A random photo of ``pool`` and a crop centre that keeps the part's cut-out inside it."""
    images = getattr(photos, pool)
    source = int(rng.integers(len(images)))
    photo = images[source][0] if pool == "pits" else images[source]
    height, width = photo.shape[:2]
    if pool in ("cells", "cracked"):  # a cell is the whole cell
        return source, ((width - 1) / 2, (height - 1) / 2)
    half = _reach(kind) * _SOURCE_SCALE[pool]
    return source, (rng.uniform(half, max(half, width - 1 - half)), rng.uniform(half, max(half, height - 1 - half)))


def _new_part(rng: np.random.Generator, photos: PhotoPools, kind: str, colour: str, slot: int, pos, angle: float) -> _Part:
    pool = _POOL_OF[kind]
    source, origin = _texture(rng, photos, pool, kind)
    return _Part(kind, colour, slot, tuple(pos), float(angle), pool, source, origin)


def _rod_at(rng, photos, row: int, colour: str = "metal") -> _Part:
    """Rods lie roughly horizontal in one of three rows of the first compartment."""
    x0, y0 = _SLOTS[0]
    pos = (x0 + _SLOT_W / 2 + rng.uniform(-0.03, 0.03), y0 + (row + 0.5) * _SLOT_H / 3 + rng.uniform(-0.012, 0.012))
    angle = np.clip(rng.normal(0, 0.05), -0.1, 0.1) + (np.pi if rng.random() < 0.5 else 0.0)
    return _new_part(rng, photos, "rod", colour, 0, pos, angle)


def _in_slot(rng, photos, kind: str, colour: str, slot: int) -> _Part:
    """A washer, cell or chip anywhere in its compartment, clear of the walls."""
    margin = _reach(kind) + 0.02
    x0, y0 = _SLOTS[slot]
    pos = (rng.uniform(x0 + margin, max(x0 + margin, x0 + _SLOT_W - margin)),
           rng.uniform(y0 + margin, max(y0 + margin, y0 + _SLOT_H - margin)))
    angle = rng.uniform(0, 2 * np.pi) if kind == "washer" else rng.uniform(-0.15, 0.15)
    return _new_part(rng, photos, kind, colour, slot, pos, angle)


def _normal_parts(rng, photos) -> list[_Part]:
    rows = sorted(rng.choice(3, size=2, replace=False))
    return [_rod_at(rng, photos, int(r)) for r in rows] + [
        _in_slot(rng, photos, "washer", "metal", 1), _in_slot(rng, photos, "cell", "blue_cell", 2),
        _in_slot(rng, photos, "chip", "green_chip", 3), _in_slot(rng, photos, "chip", "amber_chip", 4)]


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _source_map(part: _Part, pose: _Pose, win: Win) -> np.ndarray:
    """2×3 affine from window pixels to the part's photo pixels (for cv2 WARP_INVERSE_MAP)."""
    to_tray = _rotation(-pose.angle) / pose.scale
    linear = _SOURCE_SCALE[part.pool] * _rotation(-part.angle) @ to_tray
    offset = np.array([win.x0, win.y0], np.float64) - pose.centre
    shift = np.asarray(part.origin) + _SOURCE_SCALE[part.pool] * _rotation(-part.angle) @ (
        0.5 - np.asarray(part.pos) + to_tray @ offset)
    return np.hstack([linear, shift[:, None]])


def _warp(photo: np.ndarray, matrix: np.ndarray, win: Win, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    return cv2.warpAffine(photo, matrix, (win.shape[1], win.shape[0]), flags=interpolation | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def _colour(part: _Part, texture: np.ndarray) -> np.ndarray:
    """RGB of the part from its warped texture: metal as photographed (or blued), grey sources tinted."""
    if part.colour == "metal":
        return texture
    if part.colour == "blued":
        grey = texture @ np.float32([0.3, 0.59, 0.11])
        return grey[..., None] * np.float32([0.55, 0.68, 1.05])
    dark, light = (np.float32(c) for c in _TINTS[part.colour])
    grey = texture[..., None]
    return dark * (1 - grey) + light * grey


def _local_polygon(part: _Part, points) -> np.ndarray:
    return np.asarray(part.pos) + np.asarray(points, np.float64) @ _rotation(part.angle).T


def _alpha(part: _Part, pose: _Pose, win: Win) -> np.ndarray:
    if part.kind == "washer":
        canvas = np.zeros(win.shape, np.uint8)
        centre = pose.px(np.asarray(part.pos)[None])[0]
        circle(canvas, win, centre, _WASHER * pose.scale, 255)
        circle(canvas, win, centre, _WASHER_HOLE * pose.scale, 0)
        return canvas.astype(np.float32) / 255
    if part.kind == "rod":  # a rounded-end rod: a rectangle and two end caps
        a, b = _ROD
        caps = [_local_polygon(part, [[(a - b) * side + b * np.cos(t), b * np.sin(t)]
                                      for t in np.linspace(0, 2 * np.pi, 16, endpoint=False)]) for side in (-1, 1)]
        body = _local_polygon(part, rect(-(a - b), -b, a - b, b))
        return polygon_alpha(win, *(pose.px(p) for p in [body, *caps]))
    half = _CELL if part.kind == "cell" else _CHIP
    return polygon_alpha(win, pose.px(_local_polygon(part, rect(-half, -half, half, half))))


def _render_part(part: _Part, photos: PhotoPools, pose: _Pose, win: Win):
    """Coverage, RGB and (for a pitted rod) the pit's coverage of one part in its window."""
    images = getattr(photos, part.pool)
    matrix = _source_map(part, pose, win)
    photo = images[part.source][0] if part.pool == "pits" else images[part.source]
    rgb = _colour(part, _warp(photo, matrix, win))
    if part.kind == "cell":  # the cell's own dark frame would read as a gap: lift the borders a little
        rgb = np.clip(rgb, 0.02, 1.0)
    alpha = _alpha(part, pose, win)
    pit = None
    if part.pool == "pits":
        pit = _warp(images[part.source][1].astype(np.float32), matrix, win) * alpha
    return alpha, rgb.astype(np.float32), pit


def _part_window(part: _Part, pose: _Pose, size: int) -> Win:
    return Win.around(pose.px(np.asarray(part.pos)[None])[0], _reach(part.kind) * pose.scale + 8 * size / 256 + 3, size)


def _crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    """A random square of a photo's luminance, flipped at random, scaled to ``size``."""
    grey = photo @ np.float32([0.3, 0.59, 0.11])
    side = min(grey.shape)
    y, x = int(rng.integers(grey.shape[0] - side + 1)), int(rng.integers(grey.shape[1] - side + 1))
    square = grey[y: y + side, x: x + side]
    if rng.random() < 0.5:
        square = square[:, ::-1]
    return cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=cv2.INTER_LINEAR)


def _tray(rng: np.random.Generator, photos: PhotoPools, size: int) -> _Tray:
    """A tray whose floor is a real metal surface (grey, its contrast damped) on a bench of another."""
    s = size / 256
    margin = 10 * s
    centre = np.full(2, (size - 1) / 2) + rng.normal(0, 1.5 * s, 2)
    pose = _Pose(centre, float(np.clip(rng.normal(0, 0.012), -0.025, 0.025)), size - 2 * margin)
    floor_photo = _crop(rng, photos.metal[int(rng.integers(len(photos.metal)))], size)
    bench_photo = _crop(rng, photos.metal[int(rng.integers(len(photos.metal)))], size)
    bench = (0.12 + 0.25 * bench_photo)[..., None] * np.float32([1.0, 0.93, 0.86])
    tray = polygon_alpha(Win.full(size), pose.px(rect(0, 0, 1, 1)))
    floor = polygon_alpha(Win.full(size), *[pose.px(_slot_polygon(k)) for k in range(6)])
    walls = np.clip(tray - floor, 0, 1)
    wall_shadow = drop_shadow(walls, 2 * s, 3 * s, 5 * s) * floor
    floor_shade = (0.45 + 0.3 * floor_photo) * (1 - 0.3 * wall_shadow)
    floor_rgb = floor_shade[..., None] * np.float32([0.95, 0.97, 1.0])
    surface = np.float32([0.80, 0.82, 0.84]) * (1 - floor[..., None]) + floor_rgb * floor[..., None]
    tray_shadow = drop_shadow(tray, 3 * s, 4 * s, 9 * s)
    image = bench * (1 - 0.5 * tray_shadow[..., None]) * (1 - tray[..., None]) + surface * tray[..., None]
    return _Tray(image.astype(np.float32), lighting(rng, size), pose, tray)


def _draw_parts(tray: _Tray, parts, photos: PhotoPools, size: int):
    """Composite parts (with contact shadows) over the tray: the image, each part's footprint
    (part or shadow, bool H×W), and the union of the pits' coverage (a pitted rod's defect)."""
    image = tray.image.copy()
    footprints, pits = [], np.zeros((size, size), np.float32)
    s = size / 256
    for part in parts:
        win = _part_window(part, tray.pose, size)
        alpha, rgb, pit = _render_part(part, photos, tray.pose, win)
        footprints.append(_paste_part(image, win, alpha, rgb, s))
        if pit is not None:
            pits[win.slices] = np.maximum(pits[win.slices], pit)
    return image, footprints, pits


def _slot_mask(tray: _Tray, slot: int, size: int) -> np.ndarray:
    return dilate(polygon_alpha(Win.full(size), tray.pose.px(_slot_polygon(slot))) > 0)


# ---- anomalies: each returns the new part list and mask specs as in .loco -------------------

def _placed_free(tray, parts, photos, candidate: Callable[[int], _Part], slots, size: int) -> _Part:
    """Sample ``candidate(slot)`` until it touches no other part, trying slots in order; failing
    that, the candidate that touches least."""
    _, footprints, _ = _draw_parts(tray, parts, photos, size)
    taken = np.any(footprints, axis=0)
    best, best_overlap = None, np.inf
    for slot in slots:
        for _ in range(30):
            part = candidate(slot)
            _, (footprint,), _ = _draw_parts(tray, [part], photos, size)
            overlap = int((footprint & taken).sum())
            if overlap == 0:
                return part
            if overlap < best_overlap:
                best, best_overlap = part, overlap
    return best


def _missing_part(parts, rng, photos, tray, size):
    victim = int(rng.integers(len(parts)))
    return parts[:victim] + parts[victim + 1:], [("missing_part", "slot", parts[victim].slot)]


def _extra_part(parts, rng, photos, tray, size):
    """A third rod in the free row, or a second washer, cell or chip in its own compartment."""
    if rng.random() < 1 / 3:
        used = {int(round((p.pos[1] - _SLOTS[0][1]) / (_SLOT_H / 3) - 0.5)) for p in parts[:_WASHER_I]}
        extra = _rod_at(rng, photos, ({0, 1, 2} - used).pop())
    else:
        twin = parts[int(rng.choice([_WASHER_I, _CELL_I, _GREEN, _AMBER]))]
        extra = _placed_free(tray, parts, photos, lambda k: _in_slot(rng, photos, twin.kind, twin.colour, k),
                             [twin.slot], size)
    return parts + [extra], [("extra_part", "part", len(parts), None)]


def _swapped_parts(parts, rng, photos, tray, size):
    """The green and amber chips (their order broken), or the washer and the cell, trade spots."""
    a, b = (_GREEN, _AMBER) if rng.random() < 0.5 else (_WASHER_I, _CELL_I)
    new = list(parts)
    new[a] = replace(parts[b], slot=parts[a].slot, pos=parts[a].pos)
    new[b] = replace(parts[a], slot=parts[b].slot, pos=parts[b].pos)
    return new, [("swapped_parts", "part", a, a), ("swapped_parts", "part", b, b)]


def _misplaced_part(parts, rng, photos, tray, size):
    """A part lies in another compartment (marked, the empty one included), its own is short (marked)."""
    victim = int(rng.choice([_ROD_A, _WASHER_I, _CELL_I, _GREEN, _AMBER]))
    rest = parts[:victim] + parts[victim + 1:]
    moved = parts[victim]
    targets = [int(k) for k in rng.permutation([k for k in (1, 2, 3, 4, 5) if k != moved.slot])]

    def candidate(slot: int) -> _Part:
        x0, y0 = _SLOTS[slot]
        reach = _reach(moved.kind) + 0.02
        reach_y = _ROD[1] + 0.03 if moved.kind == "rod" else reach
        pos = (rng.uniform(x0 + reach, max(x0 + reach, x0 + _SLOT_W - reach)),
               rng.uniform(y0 + reach_y, max(y0 + reach_y, y0 + _SLOT_H - reach_y)))
        return replace(moved, slot=slot, pos=pos)

    placed = _placed_free(tray, rest, photos, candidate, targets, size)
    return rest + [placed], [("misplaced_part", "part", len(rest), None), ("missing_part", "slot", moved.slot)]


def _wrong_color(parts, rng, photos, tray, size):
    """Blued metal, a purple cell, or a chip in red, blue or the other chip's colour."""
    victim = int(rng.choice([_ROD_A, _WASHER_I, _CELL_I, _GREEN, _AMBER]))
    part = parts[victim]
    options = {"rod": ["blued"], "washer": ["blued"], "cell": ["purple_cell"],
               "chip": [c for c in ("green_chip", "amber_chip", "red_chip", "blue_chip") if c != part.colour]}[part.kind]
    new = list(parts)
    new[victim] = replace(part, colour=options[int(rng.integers(len(options)))])
    return new, [("wrong_color", "part", victim, victim)]


_LOGICAL = {"missing_part": _missing_part, "extra_part": _extra_part, "swapped_parts": _swapped_parts,
            "misplaced_part": _misplaced_part, "wrong_color": _wrong_color}
assert tuple(_LOGICAL) == LOGICAL_DEFECTS


def _pitted_rod(parts, rng, photos):
    """One rod cut from a real pitted photo, the pit within the rod's middle part."""
    victim = int(rng.choice([_ROD_A, _ROD_B]))
    source = int(rng.integers(len(photos.pits)))
    pit = np.array(photos.pits[source][2])
    half_length, half_width = (_ROD[0] - _ROD[1]) * _SOURCE_SCALE["pits"], 0.4 * _ROD[1] * _SOURCE_SCALE["pits"]
    # The rod's axis is the photo's x axis: shift the crop so the pit lands on the rod body.
    origin = pit + np.array([rng.uniform(-0.6, 0.6) * half_length, rng.uniform(-1, 1) * half_width])
    new = list(parts)
    new[victim] = replace(parts[victim], pool="pits", source=source, origin=(float(origin[0]), float(origin[1])))
    return new


def _cracked_cell(parts, rng, photos):
    new = list(parts)
    new[_CELL_I] = replace(parts[_CELL_I], pool="cracked", source=int(rng.integers(len(photos.cracked))))
    return new


def render_photo_loco(split: str, index: int, seed: int, size: int, defect: str | None, photos: PhotoPools) -> Rendering:
    """One photo-textured tray scene of ``split`` and stream ``index``, with ``defect`` (or none)."""
    scene_stream, defect_stream, noise_stream = streams(seed, PHOTO_CATEGORY, split, index)
    rng = np.random.default_rng(scene_stream)
    tray = _tray(rng, photos, size)
    parts = _normal_parts(rng, photos)
    clean, footprints, _ = _draw_parts(tray, parts, photos, size)
    if defect is None:
        return Rendering(clean, clean, tray.light, noise_stream, [])
    drng = np.random.default_rng(defect_stream)
    if defect in _LOGICAL:
        new_parts, specs = _LOGICAL[defect](parts, drng, photos, tray, size)
        image, new_footprints, _ = _draw_parts(tray, new_parts, photos, size)
        masks = []
        for name, what, *ids in specs:
            if what == "slot":
                masks.append((name, _slot_mask(tray, ids[0], size)))
            else:
                masks.append((name, new_footprints[ids[0]] | (footprints[ids[1]] if ids[1] is not None else False)))
    elif defect == "pitted_rod":
        image, _, pits = _draw_parts(tray, _pitted_rod(parts, drng, photos), photos, size)
        masks = [(defect, dilate(pits > 0.5) if (pits > 0.5).any() else dilate(pits > 0))]
    elif defect == "cracked_cell":
        new_parts = _cracked_cell(parts, drng, photos)
        image, new_footprints, _ = _draw_parts(tray, new_parts, photos, size)
        win = _part_window(new_parts[_CELL_I], tray.pose, size)
        cell = np.zeros((size, size), bool)
        cell[win.slices] = _alpha(new_parts[_CELL_I], tray.pose, win) > 0
        masks = [(defect, dilate(cell))]
    elif defect == "contamination":
        image, support = _contamination(clean, tray, drng, size)
        masks = [(defect, dilate(support))]
    else:
        raise ValueError(f"unknown {PHOTO_CATEGORY} defect {defect!r}")
    return Rendering(clean, image.astype(np.float32), tray.light, noise_stream, masks)
