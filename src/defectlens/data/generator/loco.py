"""The MVTec LOCO-layout "assembly" category: a tray of parts that must obey rules, with logical
anomalies (a rule broken by parts that each look normal) and structural ones (scratches, broken
parts, contamination). Masks follow MVTec LOCO: one per annotated region, valued per defect type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from .render import (SUBPIXEL_BITS, Rendering, Win, circle, curve, dilate, drop_shadow, fine_noise, lighting,
                     path_alpha, pick, polygon_alpha, rect, smooth_noise, streams)

LOCO_CATEGORY = "assembly"
LOGICAL_DEFECTS = ("missing_part", "extra_part", "swapped_parts", "misplaced_part", "wrong_color")
LOCO_STRUCTURAL_DEFECTS = ("scratch", "broken_part", "contamination")

# A tray with 2×3 compartments (tray units: the tray spans 0..1 on both axes). The rules:
# slot 0 two silver screws, slot 1 one steel nut, slot 2 one orange disc, slot 3 one blue and
# slot 4 one yellow disc (blue left of yellow), slot 5 one green cable; nothing else anywhere.

_WALL = 0.03
_SLOT_W, _SLOT_H = (1 - 4 * _WALL) / 3, (1 - 3 * _WALL) / 2
_SLOTS = [(_WALL + c * (_SLOT_W + _WALL), _WALL + r * (_SLOT_H + _WALL)) for r in range(2) for c in range(3)]
_SCREW_LENGTH, _SCREW_HEAD, _SCREW_HEAD_W, _SCREW_SHAFT_W = 0.17, 0.035, 0.055, 0.028
_NUT_R, _NUT_HOLE_R, _DISC_R, _CABLE_W = 0.058, 0.027, 0.062, 0.026
_COLOURS = {
    "silver": (0.78, 0.79, 0.82), "brass": (0.80, 0.62, 0.30), "steel": (0.66, 0.67, 0.70),
    "orange": (0.95, 0.50, 0.12), "blue": (0.15, 0.36, 0.80), "yellow": (0.96, 0.83, 0.18),
    "purple": (0.52, 0.26, 0.66), "green": (0.16, 0.60, 0.28), "red": (0.82, 0.16, 0.14),
}
# indices of the parts in a normal tray's part list (see _normal_parts)
_SCREW_A, _SCREW_B, _NUT, _ORANGE, _BLUE, _YELLOW, _CABLE = range(7)
LOCO_CONFIG = (  # name, pixel value, saturation threshold, relative?
    ("missing_part", 255, 0.15, True), ("extra_part", 254, 1.0, True), ("swapped_parts", 253, 1.0, True),
    ("misplaced_part", 252, 1.0, True), ("wrong_color", 251, 1.0, True), ("scratch", 250, 100, False),
    ("broken_part", 249, 1.0, True), ("contamination", 248, 60, False),
)


@dataclass(frozen=True)
class _Part:
    kind: str  # screw | nut | disc | cable
    colour: str
    slot: int
    pos: tuple[float, float]  # tray units: the centre, or for a cable the origin of its path
    angle: float = 0.0  # radians, tray frame
    path: tuple = ()  # cable: Bézier control points relative to ``pos``
    damage: float | None = None  # broken: screw bend angle, disc chip angle, cable cut position


@dataclass
class _Pose:
    """Where the tray lies in the image: tray units to pixels."""
    centre: np.ndarray
    angle: float
    scale: float

    def px(self, points) -> np.ndarray:
        p = (np.asarray(points, np.float64) - 0.5) * self.scale
        c, s = np.cos(self.angle), np.sin(self.angle)
        return p @ np.array([[c, s], [-s, c]]) + self.centre


def _slot_polygon(slot: int) -> np.ndarray:
    x0, y0 = _SLOTS[slot]
    return rect(x0, y0, x0 + _SLOT_W, y0 + _SLOT_H)


def _screw_at(rng: np.random.Generator, row: int, colour: str = "silver") -> _Part:
    """Screws lie roughly horizontal in one of three rows of slot 0, head left or right."""
    x0, y0 = _SLOTS[0]
    pos = (x0 + _SLOT_W / 2 + rng.uniform(-0.03, 0.03), y0 + (row + 0.5) * _SLOT_H / 3 + rng.uniform(-0.015, 0.015))
    angle = np.clip(rng.normal(0, 0.06), -0.12, 0.12) + (np.pi if rng.random() < 0.5 else 0.0)
    return _Part("screw", colour, 0, pos, float(angle))


def _round_part_in(rng: np.random.Generator, kind: str, colour: str, slot: int) -> _Part:
    """A nut or disc anywhere in its slot, clear of the walls and their shadows."""
    margin = (_NUT_R if kind == "nut" else _DISC_R) + 0.03
    x0, y0 = _SLOTS[slot]
    pos = (rng.uniform(x0 + margin, x0 + _SLOT_W - margin), rng.uniform(y0 + margin, y0 + _SLOT_H - margin))
    return _Part(kind, colour, slot, pos, float(rng.uniform(0, np.pi / 3)))


def _cable_in(rng: np.random.Generator, slot: int = 5) -> _Part:
    """A cable from the left to the right wall along a random cubic Bézier."""
    ends_x = (0.04, _SLOT_W - 0.04)
    control = [(ends_x[0], rng.uniform(0.08, _SLOT_H - 0.08)),
               (rng.uniform(0.05, _SLOT_W - 0.05), rng.uniform(0.05, _SLOT_H - 0.05)),
               (rng.uniform(0.05, _SLOT_W - 0.05), rng.uniform(0.05, _SLOT_H - 0.05)),
               (ends_x[1], rng.uniform(0.08, _SLOT_H - 0.08))]
    return _Part("cable", "green", slot, _SLOTS[slot], 0.0, tuple(control))


def _normal_parts(rng: np.random.Generator) -> list[_Part]:
    rows = sorted(rng.choice(3, size=2, replace=False))
    return [_screw_at(rng, int(r)) for r in rows] + [
        _round_part_in(rng, "nut", "steel", 1), _round_part_in(rng, "disc", "orange", 2),
        _round_part_in(rng, "disc", "blue", 3), _round_part_in(rng, "disc", "yellow", 4), _cable_in(rng)]


def _rod(pose: _Pose, win: Win, start, axis, stations, half_widths, along0: float, colour, threaded_from: float):
    """A cylinder piece (screw head or shaft) seen from the side: outline through ``stations``
    (distance along ``axis`` from ``start``) with ``half_widths``, cylindrical shading and threads."""
    normal = np.array([-axis[1], axis[0]])
    upper = [start + axis * a + normal * w for a, w in zip(stations, half_widths)]
    lower = [start + axis * a - normal * w for a, w in zip(stations, half_widths)]
    alpha = polygon_alpha(win, pose.px(np.array(upper + lower[::-1])))
    yy, xx = win.coords()
    c, s = np.cos(pose.angle), np.sin(pose.angle)
    axis_px = np.array([axis[0] * c - axis[1] * s, axis[0] * s + axis[1] * c])
    origin = pose.px(start[None])[0]
    along = ((xx - origin[0]) * axis_px[0] + (yy - origin[1]) * axis_px[1]) / pose.scale + along0
    across = ((xx - origin[0]) * -axis_px[1] + (yy - origin[1]) * axis_px[0]) / pose.scale
    half = np.interp(along - along0, stations, half_widths).astype(np.float32)
    shade = 0.45 + 0.55 * np.sqrt(np.clip(1 - (across / np.maximum(half, 1e-4)) ** 2, 0, 1))
    shade *= np.where(along > threaded_from, 1 + 0.2 * np.sin(2 * np.pi * along / 0.009), 1.0)
    return alpha, shade[..., None] * np.float32(_COLOURS[colour])


def _render_screw(part: _Part, pose: _Pose, win: Win):
    """Head plus shaft, in two pieces joined at the bend point so a bent screw shares all
    pixels of the straight one up to the bend."""
    axis = np.array([np.cos(part.angle), np.sin(part.angle)])
    tail = np.asarray(part.pos) - axis * _SCREW_LENGTH / 2
    hw, sw, head = _SCREW_HEAD_W / 2, _SCREW_SHAFT_W / 2, _SCREW_HEAD
    bend_at = _SCREW_HEAD + 0.55 * (_SCREW_LENGTH - _SCREW_HEAD)
    a1, rgb1 = _rod(pose, win, tail, axis, [0, head, head, bend_at], [hw, hw, sw, sw], 0.0, part.colour, head)
    bend = part.damage or 0.0
    axis2 = np.array([np.cos(part.angle + bend), np.sin(part.angle + bend)])
    rest = _SCREW_LENGTH - bend_at
    overlap = 0.004  # the distal piece starts inside the first so no seam shows at the joint
    stations = [0, overlap + rest - 0.012, overlap + rest]  # shaft, then a short taper to the tip
    a2, rgb2 = _rod(pose, win, tail + axis * bend_at - axis2 * overlap, axis2, stations, [sw, sw, sw * 0.4],
                    bend_at - overlap, part.colour, head)
    return np.maximum(a1, a2), np.where((a2 > 0)[..., None], rgb2, rgb1)


def _render_nut(part: _Part, pose: _Pose, win: Win):
    """Hex nut with flat-shaded facets and a dark threaded bore."""
    angles = part.angle + np.arange(6) * np.pi / 3
    hexagon = np.asarray(part.pos) + _NUT_R * np.stack([np.cos(angles), np.sin(angles)], 1)
    canvas = np.zeros(win.shape, np.uint8)
    cv2.fillPoly(canvas, [win.fixed(pose.px(hexagon))], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    centre = pose.px(np.asarray(part.pos)[None])[0]
    circle(canvas, win, centre, _NUT_HOLE_R * pose.scale, 0)
    yy, xx = win.coords()
    theta = np.arctan2(yy - centre[1], xx - centre[0]) - (part.angle + pose.angle)
    facet = np.round((theta - np.pi / 6) / (np.pi / 3)) * (np.pi / 3) + np.pi / 6
    r = np.hypot(xx - centre[0], yy - centre[1]) / pose.scale
    shade = 0.74 + 0.14 * np.cos(facet + part.angle + pose.angle - 0.8)
    shade *= np.where(r < _NUT_HOLE_R + 0.01, 0.8, 1.0)
    return canvas.astype(np.float32) / 255, shade[..., None] * np.float32(_COLOURS[part.colour])


def _render_disc(part: _Part, pose: _Pose, win: Win):
    """Domed plastic disc with a darker rim and a soft highlight; a broken one has a chip bitten out."""
    centre = pose.px(np.asarray(part.pos)[None])[0]
    radius = _DISC_R * pose.scale
    canvas = np.zeros(win.shape, np.uint8)
    circle(canvas, win, centre, radius, 255)
    if part.damage is not None:
        bite = centre + radius * np.array([np.cos(part.damage), np.sin(part.damage)])
        circle(canvas, win, bite, 0.4 * radius, 0)
    yy, xx = win.coords()
    d2 = ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / radius**2
    highlight = centre - 0.3 * radius
    spot = np.exp(-((xx - highlight[0]) ** 2 + (yy - highlight[1]) ** 2) / (0.3 * radius) ** 2)
    shade = (0.84 + 0.16 * (1 - d2)) * np.where(d2 > 0.8, 0.88, 1.0)
    rgb = shade[..., None] * np.float32(_COLOURS[part.colour]) + 0.18 * spot[..., None]
    return canvas.astype(np.float32) / 255, rgb


def _cable_curve(part: _Part) -> np.ndarray:
    t = np.linspace(0, 1, 40)[:, None]
    p = np.asarray(part.path) + np.asarray(part.pos)
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


def _render_cable(part: _Part, pose: _Pose, win: Win):
    """Insulated cable along a Bézier with a highlight stripe; a cut one shows copper ends."""
    curve = _cable_curve(part)
    pieces = [curve]
    if part.damage is not None:
        cut = int(part.damage * len(curve))
        pieces = [curve[: cut - 4], curve[cut + 4:]]
    width = max(2, int(round(_CABLE_W * pose.scale)))
    px_pieces = [pose.px(c) for c in pieces]
    alpha = path_alpha(win, px_pieces, width)
    shine = path_alpha(win, [c + np.array([-0.2, -0.25]) * width for c in px_pieces], max(1, width // 3))
    rgb = (0.78 + 0.35 * shine)[..., None] * np.float32(_COLOURS[part.colour])
    if part.damage is not None:
        copper = np.zeros(win.shape, np.uint8)
        for end in (px_pieces[0][-1], px_pieces[1][0]):
            circle(copper, win, end, 0.3 * width, 255)
        c = (copper.astype(np.float32) / 255)[..., None]
        rgb = rgb * (1 - c) + c * np.float32([0.85, 0.52, 0.25])
    return alpha, rgb


_PART_RENDERERS = {"screw": _render_screw, "nut": _render_nut, "disc": _render_disc, "cable": _render_cable}


def _part_window(part: _Part, pose: _Pose, size: int) -> Win:
    """The part's bounding circle plus room for its contact shadow."""
    if part.kind == "cable":
        curve = _cable_curve(part)
        lo, hi = curve.min(0), curve.max(0)
        centre, reach = (lo + hi) / 2, np.hypot(*(hi - lo)) / 2 + _CABLE_W
    else:
        reach = {"screw": _SCREW_LENGTH / 2, "nut": _NUT_R, "disc": _DISC_R}[part.kind]
        centre = np.asarray(part.pos)
    return Win.around(pose.px(centre[None])[0], reach * pose.scale + 8 * size / 256 + 3, size)


@dataclass
class _Tray:
    image: np.ndarray
    light: np.ndarray
    pose: _Pose
    tray: np.ndarray  # coverage of the tray


def _tray(rng: np.random.Generator, size: int) -> _Tray:
    """Grey plastic tray with compartments on a dark bench; its pose jitters per image."""
    s = size / 256
    margin = 10 * s
    centre = np.full(2, (size - 1) / 2) + rng.normal(0, 1.5 * s, 2)
    pose = _Pose(centre, float(np.clip(rng.normal(0, 0.012), -0.025, 0.025)), size - 2 * margin)
    bench = (0.23 + 0.012 * smooth_noise(rng, size, 6) + 0.008 * fine_noise(rng, size, 1, 1))[..., None]
    bench = bench * np.float32([1.0, 0.93, 0.86])
    tray = polygon_alpha(Win.full(size), pose.px(rect(0, 0, 1, 1)))
    floor = polygon_alpha(Win.full(size), *[pose.px(_slot_polygon(k)) for k in range(6)])
    walls = np.clip(tray - floor, 0, 1)
    wall_shadow = drop_shadow(walls, 2 * s, 3 * s, 5 * s) * floor
    floor_shade = (1 + 0.015 * fine_noise(rng, size, 1.0, 1.0)) * (1 - 0.3 * wall_shadow)
    floor_rgb = floor_shade[..., None] * np.float32([0.64, 0.67, 0.70])
    surface = np.float32([0.80, 0.82, 0.84]) * (1 - floor[..., None]) + floor_rgb * floor[..., None]
    tray_shadow = drop_shadow(tray, 3 * s, 4 * s, 9 * s)
    image = bench * (1 - 0.5 * tray_shadow[..., None]) * (1 - tray[..., None]) + surface * tray[..., None]
    return _Tray(image.astype(np.float32), lighting(rng, size), pose, tray)



def _paste_part(image: np.ndarray, win, alpha: np.ndarray, rgb: np.ndarray, scale: float) -> np.ndarray:
    """Paint a part (``alpha``, ``rgb`` over window ``win``) with its drop shadow into ``image``
    in place; returns its dilated footprint (part or shadow), bool over the whole image."""
    shadow = drop_shadow(alpha, 1.5 * scale, 2.5 * scale, 3 * scale)
    patch = image[win.slices] * (1 - 0.35 * shadow[..., None])
    image[win.slices] = patch * (1 - alpha[..., None]) + rgb * alpha[..., None]
    footprint = np.zeros(image.shape[:2], bool)
    footprint[win.slices] = (alpha > 0) | (shadow > 0)
    return dilate(footprint)

def _draw_parts(tray: _Tray, parts: Sequence[_Part], size: int):
    """Composite parts (with contact shadows) over the tray; returns the image, each part's
    footprint (part or its shadow, bool H×W) and the union part coverage."""
    image = tray.image.copy()
    footprints, cover = [], np.zeros((size, size), np.float32)
    s = size / 256
    for part in parts:
        win = _part_window(part, tray.pose, size)
        alpha, rgb = _PART_RENDERERS[part.kind](part, tray.pose, win)
        footprints.append(_paste_part(image, win, alpha, rgb, s))
        cover[win.slices] = np.maximum(cover[win.slices], alpha)
    return image, footprints, cover


def _slot_mask(tray: _Tray, slot: int, size: int) -> np.ndarray:
    return dilate(polygon_alpha(Win.full(size), tray.pose.px(_slot_polygon(slot))) > 0)


# ---- LOCO anomalies -------------------------------------------------------------------------
# A logical anomaly returns the new part list and its mask specs: ("slot", k) marks a whole
# compartment (where something should have been), ("part", new_i, clean_i) the footprint of
# part new_i, joined with clean part clean_i's footprint when it replaced that one.


def _placed_free(tray: _Tray, parts: list[_Part], candidate: Callable[[int], _Part], slots, size: int) -> _Part:
    """Sample ``candidate(slot)`` until its footprint touches no other part, trying slots in order;
    on a crowded small image settle for the candidate that touches least."""
    _, footprints, _ = _draw_parts(tray, parts, size)
    taken = np.any(footprints, axis=0)
    best, best_overlap = None, np.inf
    for slot in slots:
        for _ in range(30):
            part = candidate(slot)
            _, (footprint,), _ = _draw_parts(tray, [part], size)
            overlap = int((footprint & taken).sum())
            if overlap == 0:
                return part
            if overlap < best_overlap:
                best, best_overlap = part, overlap
    return best


def _missing_part(parts, rng, tray, size):
    """A part is gone; its compartment is marked. A missing screw leaves one: a count violation."""
    victim = int(rng.integers(len(parts)))
    return parts[:victim] + parts[victim + 1:], [("missing_part", "slot", parts[victim].slot)]


def _extra_part(parts, rng, tray, size):
    """One part too many in its own compartment; it is the part that is marked."""
    if rng.random() < 1 / 3:  # a third screw in the free row: a count violation that looks normal locally
        used = {int(round((p.pos[1] - _SLOTS[0][1]) / (_SLOT_H / 3) - 0.5)) for p in parts[:_NUT]}
        extra = _screw_at(rng, ({0, 1, 2} - used).pop())
    else:
        twin = parts[int(rng.choice([_NUT, _ORANGE, _BLUE, _YELLOW]))]
        extra = _placed_free(tray, parts, lambda k: _round_part_in(rng, twin.kind, twin.colour, k), [twin.slot], size)
    return parts + [extra], [("extra_part", "part", len(parts), None)]


def _swapped_parts(parts, rng, tray, size):
    """Two parts trade places: the blue and yellow discs (their left-right order is violated), or
    the nut and the orange disc. Each takes the other's exact spot, so both spots are marked."""
    a, b = (_BLUE, _YELLOW) if rng.random() < 0.5 else (_NUT, _ORANGE)
    new = list(parts)
    new[a] = replace(parts[b], slot=parts[a].slot, pos=parts[a].pos)
    new[b] = replace(parts[a], slot=parts[b].slot, pos=parts[b].pos)
    return new, [("swapped_parts", "part", a, a), ("swapped_parts", "part", b, b)]


def _misplaced_part(parts, rng, tray, size):
    """A part lies in another compartment (marked), and its own compartment is short (marked)."""
    victim = int(rng.choice([_SCREW_A, _NUT, _ORANGE, _BLUE, _YELLOW]))
    rest = parts[:victim] + parts[victim + 1:]
    moved = parts[victim]
    targets = [int(k) for k in rng.permutation([k for k in (1, 2, 3, 4) if k != moved.slot])]

    def candidate(slot: int) -> _Part:
        x0, y0 = _SLOTS[slot]
        reach = _SCREW_LENGTH / 2 + 0.02 if moved.kind == "screw" else _DISC_R + 0.03
        reach_y = _SCREW_HEAD_W / 2 + 0.03 if moved.kind == "screw" else reach
        pos = (rng.uniform(x0 + reach, x0 + _SLOT_W - reach), rng.uniform(y0 + reach_y, y0 + _SLOT_H - reach_y))
        return replace(moved, slot=slot, pos=pos)

    placed = _placed_free(tray, rest, candidate, targets, size)
    return rest + [placed], [("misplaced_part", "part", len(rest), None), ("missing_part", "slot", moved.slot)]


def _wrong_color(parts, rng, tray, size):
    """One part in an off-rule colour; a disc may wear a colour that is normal in another slot."""
    victim = int(rng.choice([_SCREW_A, _NUT, _ORANGE, _BLUE, _YELLOW, _CABLE]))
    discs = [c for c in ("orange", "blue", "yellow", "purple") if c != parts[victim].colour]
    options = {"screw": ["brass"], "nut": ["brass"], "cable": ["red"], "disc": discs}[parts[victim].kind]
    new = list(parts)
    new[victim] = replace(parts[victim], colour=options[rng.integers(len(options))])
    return new, [("wrong_color", "part", victim, victim)]


_LOGICAL = {"missing_part": _missing_part, "extra_part": _extra_part, "swapped_parts": _swapped_parts,
            "misplaced_part": _misplaced_part, "wrong_color": _wrong_color}


def _broken_part(parts, rng):
    """A bent screw, a chipped disc or a cut cable (the nut has no broken form)."""
    victim = int(rng.choice([_SCREW_A, _SCREW_B, _ORANGE, _BLUE, _YELLOW, _CABLE]))
    part = parts[victim]
    if part.kind == "screw":
        damage = rng.choice([-1, 1]) * rng.uniform(0.3, 0.55)
    elif part.kind == "cable":
        damage = rng.uniform(0.35, 0.65)
    else:
        damage = rng.uniform(0, 2 * np.pi)
    new = list(parts)
    new[victim] = replace(part, damage=float(damage))
    return new


def _tray_scratch(image, cover, footprints, tray: _Tray, rng, size):
    """Whitish scratch on the tray plastic, never over a part."""
    free = (tray.tray >= 1) & ~np.any(footprints, axis=0)
    sites = cv2.erode(free.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    path = curve(rng, pick(rng, sites), rng.uniform(0.1, 0.25) * size, rng.uniform(-0.8, 0.8), 0.04, 20)
    fade = np.sin(np.pi * np.linspace(0.04, 0.96, len(path) - 1)) ** 0.5
    alpha = path_alpha(Win.full(size), [path], 1, [fade]) * tray.tray * (1 - cover)
    return image + rng.uniform(0.06, 0.12) * alpha[..., None], alpha > 0


def _contamination(image, tray: _Tray, rng, size):
    """A dark crumb or a fibre lying anywhere on the tray, parts included."""
    s = size / 256
    sites = cv2.erode((tray.tray >= 1).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    start = pick(rng, sites)
    if rng.random() < 0.35:
        fibre = curve(rng, start, rng.uniform(0.06, 0.12) * size, rng.uniform(-2, 2), 0.1, 16)
        alpha = path_alpha(Win.full(size), [fibre], 1)
    else:
        angles = np.linspace(0, 2 * np.pi, 14, endpoint=False)
        radii = max(2.0, rng.uniform(3, 7) * s) * rng.uniform(0.6, 1.2, len(angles))
        alpha = polygon_alpha(Win.full(size), start + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None])
    alpha *= rng.uniform(0.75, 0.95) * tray.tray
    dirt = np.float32([0.26, 0.19, 0.13]) * rng.uniform(0.7, 1.2)
    return image * (1 - alpha[..., None]) + dirt * alpha[..., None], alpha > 0


def render_loco(split: str, index: int, seed: int, size: int, defect: str | None) -> Rendering:
    """One tray scene of ``split`` and stream ``index``, with ``defect`` (or none) and its masks."""
    scene_stream, defect_stream, noise_stream = streams(seed, LOCO_CATEGORY, split, index)
    rng = np.random.default_rng(scene_stream)
    tray = _tray(rng, size)
    parts = _normal_parts(rng)
    clean, footprints, cover = _draw_parts(tray, parts, size)
    if defect is None:
        return Rendering(clean, clean, tray.light, noise_stream, [])
    drng = np.random.default_rng(defect_stream)
    if defect in _LOGICAL:
        new_parts, specs = _LOGICAL[defect](parts, drng, tray, size)
        image, new_footprints, _ = _draw_parts(tray, new_parts, size)
        masks = []
        for name, what, *ids in specs:
            if what == "slot":
                masks.append((name, _slot_mask(tray, ids[0], size)))
            else:
                mask = new_footprints[ids[0]] | (footprints[ids[1]] if ids[1] is not None else False)
                masks.append((name, mask))
    elif defect == "broken_part":
        image, _, _ = _draw_parts(tray, _broken_part(parts, drng), size)
        masks = [(defect, dilate(np.any(image != clean, axis=2)))]
    elif defect == "scratch":
        image, support = _tray_scratch(clean, cover, footprints, tray, drng, size)
        masks = [(defect, dilate(support))]
    else:
        image, support = _contamination(clean, tray, drng, size)
        masks = [(defect, dilate(support))]
    return Rendering(clean, image.astype(np.float32), tray.light, noise_stream, masks)


ASSEMBLY_RULES = (
    "Rules of a normal tray (2x3 compartments, read left to right, top row first): two silver screws;\n"
    "one steel hex nut; one orange disc; one blue disc; one yellow disc (blue left of yellow); one green\n"
    "cable. Positions within a compartment, small rotations, tray pose and lighting vary.\n"
    "Logical anomalies break a rule (a missing part is marked by its whole compartment, one screw too\n"
    "few or too many is a count violation that looks normal locally); structural ones are a scratch on\n"
    "the tray, a bent screw / chipped disc / cut cable, or a contamination.\n")


@dataclass(frozen=True)
class LocoScene:
    """What the writer needs of a LOCO-layout category: its renderer ``(split, index, seed, size,
    defect) -> Rendering``, its structural defect types, its defects_config rows and its rules."""
    render: Callable[[str, int, int, int, str | None], Rendering]
    structural: tuple[str, ...]
    config: tuple
    rules: str


def loco_split(defect: str | None) -> str:
    """The LOCO test folder (and ground-truth folder) of a defect type; "good" for normal images."""
    if defect is None:
        return "good"
    return "logical_anomalies" if defect in LOGICAL_DEFECTS else "structural_anomalies"


def loco_index(defect: str, i: int, structural: Sequence[str] = LOCO_STRUCTURAL_DEFECTS) -> int:
    """Stream index of the i-th image of a type: types share one numbering per test folder."""
    kinds = LOGICAL_DEFECTS if defect in LOGICAL_DEFECTS else tuple(structural)
    return kinds.index(defect) * 100_000 + i


ASSEMBLY = LocoScene(render_loco, LOCO_STRUCTURAL_DEFECTS, LOCO_CONFIG, ASSEMBLY_RULES)
