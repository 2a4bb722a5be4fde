"""Object categories: one part on a background, with pose, lighting and background varying per image;
defects land on the part only, deformations on its outline."""

from __future__ import annotations

import cv2
import numpy as np

from .defects import Scene, object_scene
from .render import SUBPIXEL_BITS, Win, circle, coords, drop_shadow, fine_noise, lighting, path_alpha, rect, smooth_noise


def washer(rng: np.random.Generator, size: int) -> Scene:
    """A keyed, turned steel washer on a dark belt: centre and key angle jitter per image."""
    s = size / 256
    yy, xx = coords(size)
    centre = np.full(2, (size - 1) / 2) + rng.normal(0.0, 2.5 * s, 2)
    rotation = np.deg2rad(np.clip(rng.normal(0.0, 5.0), -12, 12))
    r_out, r_in = 84 * s * rng.uniform(0.99, 1.01), 36 * s
    win = Win.full(size)
    canvas = np.zeros(win.shape, np.uint8)
    circle(canvas, win, centre, r_out, 255)
    circle(canvas, win, centre, r_in, 0)
    # The key tab pointing into the bore makes the rotation visible.
    key = np.array([np.cos(rotation - np.pi / 2), np.sin(rotation - np.pi / 2)])
    side = np.array([-key[1], key[0]]) * 5 * s
    near, far = centre + key * (r_in - 9 * s), centre + key * (r_in + 2 * s)
    tab = win.fixed([near - side, near + side, far + side, far - side])
    cv2.fillPoly(canvas, [tab], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    alpha = canvas.astype(np.float32) / 255.0

    dx, dy = xx - centre[0], yy - centre[1]
    r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    light_angle = rng.uniform(0, 2 * np.pi)
    # Turning leaves fine concentric rings with random depth; they reflect as a bow-tie.
    ring_depth = np.convolve(rng.normal(0, 1, int(r_out) + 8), np.ones(3) / 3, mode="same")
    rings = 0.03 * np.sin(2 * np.pi * r / max(2.2 * s, 1.5) + rng.uniform(0, 2 * np.pi))
    rings += 0.02 * np.interp(r, np.arange(len(ring_depth)), ring_depth)
    bowtie = 0.09 * np.cos(2 * (theta - light_angle)) + 0.04 * np.cos(theta - light_angle)
    chamfer = 0.12 * np.clip(1 - (r_out - r) / (3 * s), 0, 1) - 0.10 * np.clip(1 - (r - r_in) / (2.5 * s), 0, 1)
    metal = (0.56 + rings + bowtie + chamfer)[..., None] * np.float32([0.96, 0.98, 1.02])

    belt = 0.17 + 0.012 * smooth_noise(rng, size, 6) + 0.012 * fine_noise(rng, size, 0.8, 0.8)
    belt = belt[..., None] * np.float32([0.95, 1.0, 1.08])
    away = light_angle + np.pi
    shadow = drop_shadow(alpha, 2.5 * s * np.cos(away), 2.5 * s * np.sin(away) + 1.5 * s, 7 * s)
    a = alpha[..., None]
    image = belt * (1 - 0.6 * shadow[..., None]) * (1 - a) + metal * a
    sites = cv2.erode((alpha >= 1).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, int(3 * s))) > 0
    edge_sites = (np.abs(r - r_out) < 0.75) & (alpha > 0)
    return Scene(image.astype(np.float32), lighting(rng, size), alpha, sites, edge_sites, centre)



def _frame(rng: np.random.Generator, size: int, jitter: float, angle: float):
    """A part's pose: its centre near the image centre and its axis and normal unit vectors."""
    centre = np.full(2, (size - 1) / 2) + rng.normal(0.0, jitter, 2)
    axis = np.array([np.cos(angle), np.sin(angle)])
    return centre, axis, np.array([-axis[1], axis[0]])


def _local(size: int, centre, axis, normal) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's coordinates along the part's axis and normal, in pixels from its centre."""
    yy, xx = coords(size)
    dx, dy = xx - centre[0], yy - centre[1]
    return dx * axis[0] + dy * axis[1], dx * normal[0] + dy * normal[1]


def _place(points, centre, axis, normal) -> np.ndarray:
    """Part-frame points (along, across) to image pixels."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return centre + p[:, :1] * axis + p[:, 1:] * normal


def _on_background(background: np.ndarray, part: np.ndarray, alpha: np.ndarray, shadow_offset, blur: float,
                   depth: float) -> np.ndarray:
    shadow = drop_shadow(alpha, shadow_offset[0], shadow_offset[1], blur)[..., None]
    a = alpha[..., None]
    return background * (1 - depth * shadow) * (1 - a) + part * a


def screw(rng: np.random.Generator, size: int) -> Scene:
    """A steel machine screw lying on white paper, seen from above: round head with a slot,
    threaded shaft with a pointed tip; it lies at any angle, anywhere near the centre."""
    s = size / 256
    centre, axis, normal = _frame(rng, size, 8 * s, rng.uniform(0, 2 * np.pi))
    length, head_r, half_w = 160 * s, 22 * s, 9 * s
    head_at, tip_from = -length / 2 + head_r, length / 2 - 16 * s
    win = Win.full(size)
    canvas = np.zeros(win.shape, np.uint8)
    shaft = _place([(head_at, half_w), (tip_from, half_w), (length / 2, 0), (tip_from, -half_w), (head_at, -half_w)],
                   centre, axis, normal)
    cv2.fillPoly(canvas, [win.fixed(shaft)], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    head_c = _place([(head_at, 0)], centre, axis, normal)[0]
    circle(canvas, win, head_c, head_r, 255)
    alpha = canvas.astype(np.float32) / 255.0

    along, across = _local(size, centre, axis, normal)
    taper = np.clip((length / 2 - along) / (length / 2 - tip_from), 1e-3, 1) * half_w
    cylinder = np.sqrt(np.clip(1 - (across / taper) ** 2, 0, 1))
    threads = 1 + 0.22 * np.sin(2 * np.pi * along / max(5 * s, 2.0))
    shaft_shade = (0.45 + 0.5 * cylinder) * threads
    yy, xx = coords(size)
    r = np.hypot(xx - head_c[0], yy - head_c[1])
    slot_dir = rng.uniform(0, np.pi)
    slot = np.abs((xx - head_c[0]) * -np.sin(slot_dir) + (yy - head_c[1]) * np.cos(slot_dir)) < 2.5 * s
    head_shade = (0.55 + 0.4 * np.sqrt(np.clip(1 - (r / head_r) ** 2, 0, 1))) * np.where(slot & (r < 0.8 * head_r), 0.35, 1.0)
    shade = np.where(r < head_r + 1, np.maximum(head_shade, np.where(along > head_at + head_r, shaft_shade, 0)), shaft_shade)
    metal = shade[..., None] * np.float32([0.70, 0.72, 0.76])
    paper = (0.88 + 0.015 * smooth_noise(rng, size, 5) + 0.01 * fine_noise(rng, size, 0.8, 0.8))[..., None]
    image = _on_background(paper * np.float32([1.0, 0.99, 0.96]), metal, alpha, (3 * s, 4 * s), 7 * s, 0.45)
    return object_scene(image, lighting(rng, size), alpha, centre, contrast=1.2)


def capsule(rng: np.random.Generator, size: int) -> Scene:
    """A red-and-ivory gelatine capsule on a dark slate tray: rounded ends, cylindrical shading,
    a glossy stripe and the seam between the halves; any angle, anywhere near the centre."""
    s = size / 256
    centre, axis, normal = _frame(rng, size, 10 * s, rng.uniform(0, 2 * np.pi))
    half_len, radius = 85 * s, 32 * s
    body = half_len - radius
    arc = np.linspace(-np.pi / 2, np.pi / 2, 25)
    outline = np.concatenate([np.stack([body + radius * np.cos(arc), radius * np.sin(arc)], 1),
                              np.stack([-body - radius * np.cos(arc), -radius * np.sin(arc)], 1)])
    win = Win.full(size)
    canvas = np.zeros(win.shape, np.uint8)
    cv2.fillPoly(canvas, [win.fixed(_place(outline, centre, axis, normal))], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    alpha = canvas.astype(np.float32) / 255.0

    along, across = _local(size, centre, axis, normal)
    # distance from the capsule's spine, over its radius: a sphere at each end, a cylinder between
    d = np.hypot(along - np.clip(along, -body, body), across) / radius
    shade = 0.55 + 0.45 * np.sqrt(np.clip(1 - d**2, 0, 1))
    seam_at = 0.1 * half_len
    seam = np.exp(-(((along - seam_at) / max(1.5 * s, 0.7)) ** 2))
    colour = np.where((along < seam_at)[..., None], np.float32([0.80, 0.16, 0.12]), np.float32([0.93, 0.88, 0.76]))
    gloss = 0.22 * np.exp(-(((across + 0.4 * radius) / (0.2 * radius)) ** 2)) * (np.abs(along) < body)
    shell = (shade * (1 - 0.35 * seam))[..., None] * colour + gloss[..., None]
    slate = (0.15 + 0.01 * smooth_noise(rng, size, 6) + 0.012 * fine_noise(rng, size, 1.0, 1.0))[..., None]
    image = _on_background(slate * np.float32([0.95, 1.0, 1.02]), shell, alpha, (2 * s, 3 * s), 6 * s, 0.5)
    return object_scene(image, lighting(rng, size), alpha, centre)


def hex_nut(rng: np.random.Generator, size: int) -> Scene:
    """A brass hex nut seen from above on a blue rubber mat: chamfered corners around a flat
    turned face, a threaded bore showing the mat; it turns freely and shifts a little."""
    s = size / 256
    turn = rng.uniform(0, np.pi / 3)
    centre, _, _ = _frame(rng, size, 6 * s, turn)
    corner_r, bore_r = 78 * s, 27 * s
    face_r = 0.93 * corner_r * np.cos(np.pi / 6)
    corners = turn + np.arange(6) * np.pi / 3
    win = Win.full(size)
    canvas = np.zeros(win.shape, np.uint8)
    cv2.fillPoly(canvas, [win.fixed(centre + corner_r * np.stack([np.cos(corners), np.sin(corners)], 1))], 255,
                 cv2.LINE_AA, SUBPIXEL_BITS)
    circle(canvas, win, centre, bore_r, 0)
    alpha = canvas.astype(np.float32) / 255.0

    yy, xx = coords(size)
    r, theta = np.hypot(xx - centre[0], yy - centre[1]), np.arctan2(yy - centre[1], xx - centre[0])
    light = rng.uniform(0, 2 * np.pi)
    corner = np.round((theta - turn) / (np.pi / 3)) * (np.pi / 3) + turn  # the chamfer facet of each corner
    chamfer = 0.62 + 0.18 * np.cos(corner - light)
    turned = 0.86 + 0.03 * np.sin(2 * np.pi * r / max(2.5 * s, 1.2)) + 0.05 * np.cos(2 * (theta - light))
    thread = np.clip(1 - (r - bore_r) / max(5 * s, 1.5), 0, 1)
    shade = np.where(r < face_r, turned, chamfer) * (1 - 0.4 * thread)
    brass = shade[..., None] * np.float32([0.82, 0.63, 0.30])
    mat = (0.30 + 0.02 * smooth_noise(rng, size, 5) + 0.02 * fine_noise(rng, size, 0.9, 0.9))[..., None]
    image = _on_background(mat * np.float32([0.70, 0.92, 1.35]), brass, alpha, (2.5 * s, 3.5 * s), 6 * s, 0.5)
    return object_scene(image, lighting(rng, size), alpha, centre, contrast=1.2)


def connector(rng: np.random.Generator, size: int) -> Scene:
    """A cream nylon 2×6 pin header soldered on a green circuit board with a silkscreen outline and
    copper traces; gold pins sit in square recesses. Board and part shift and twist slightly."""
    s = size / 256
    centre, axis, normal = _frame(rng, size, 6 * s, np.deg2rad(rng.normal(0.0, 3.0)))
    half_l, half_w, pin, pitch = 88 * s, 34 * s, 6 * s, 26 * s
    win = Win.full(size)
    canvas = np.zeros(win.shape, np.uint8)
    cv2.fillPoly(canvas, [win.fixed(_place(rect(-half_l, -half_w, half_l, half_w), centre, axis, normal))], 255,
                 cv2.LINE_AA, SUBPIXEL_BITS)
    alpha = canvas.astype(np.float32) / 255.0
    pins = [(pitch * (k - 2.5), 13 * s * row) for k in range(6) for row in (-1, 1)]
    recess_canvas, pin_canvas = np.zeros(win.shape, np.uint8), np.zeros(win.shape, np.uint8)
    for a, b in pins:
        cv2.fillPoly(recess_canvas, [win.fixed(_place(rect(a - 1.7 * pin, b - 1.7 * pin, a + 1.7 * pin, b + 1.7 * pin),
                                                      centre, axis, normal))], 255, cv2.LINE_AA, SUBPIXEL_BITS)
        cv2.fillPoly(pin_canvas, [win.fixed(_place(rect(a - pin, b - pin, a + pin, b + pin), centre, axis, normal))], 255,
                     cv2.LINE_AA, SUBPIXEL_BITS)
    recess, gold = recess_canvas.astype(np.float32) / 255.0, pin_canvas.astype(np.float32) / 255.0

    along, across = _local(size, centre, axis, normal)
    bevel = np.clip(1 - np.minimum(half_l - np.abs(along), half_w - np.abs(across)) / max(4 * s, 1.5), 0, 1)
    nylon = ((0.90 - 0.12 * bevel) * (1 + 0.02 * fine_noise(rng, size, 1.5, 1.5)))[..., None] * np.float32([0.93, 0.88, 0.74])
    nylon = nylon * (1 - 0.45 * recess[..., None])
    pyramid = 0.85 + 0.15 * np.cos(np.arctan2(across, along) * 4)  # a pin's square tip catches light on two sides
    part = nylon * (1 - gold[..., None]) + (pyramid[..., None] * np.float32([0.88, 0.70, 0.28])) * gold[..., None]

    board = (0.9 + 0.05 * fine_noise(rng, size, 1.2, 1.2))[..., None] * np.float32([0.10, 0.36, 0.20])
    reach = half_l + 24 * s
    traces = [_place([(sign * half_l, off), (sign * reach, off), (sign * (reach + size), off + sign * 0.6 * size)],
                     centre, axis, normal) for sign in (-1, 1) for off in (-16 * s, 0.0, 16 * s)]
    copper = path_alpha(win, traces, max(1, int(round(4 * s))))[..., None]
    frame = rect(-half_l - 8 * s, -half_w - 8 * s, half_l + 8 * s, half_w + 8 * s)
    silk = path_alpha(win, [_place(np.vstack([frame, frame[:1]]), centre, axis, normal)], max(1, int(round(2 * s))))[..., None]
    board = board * (1 - copper) + np.float32([0.20, 0.50, 0.26]) * copper
    board = board * (1 - silk) + np.float32([0.92, 0.92, 0.88]) * silk
    image = _on_background(board, part, alpha, (2 * s, 3 * s), 5 * s, 0.5)
    return object_scene(image, lighting(rng, size), alpha, centre)


def gear(rng: np.random.Generator, size: int) -> Scene:
    """A blued-steel spur gear with 18 teeth, a hub and four lightening holes on kraft card; it
    turns freely and shifts a little."""
    s = size / 256
    teeth, turn = 18, rng.uniform(0, 2 * np.pi)
    centre, _, _ = _frame(rng, size, 6 * s, turn)
    root_r, tip_r, bore_r = 72 * s, 88 * s, 13 * s
    step = 2 * np.pi / teeth
    # each tooth a trapezoid: root, tip, tip, root (the flanks narrow towards the tip)
    angles = turn + np.arange(teeth)[:, None] * step + np.array([0.0, 0.18, 0.42, 0.6]) * step
    radii = np.array([root_r, tip_r, tip_r, root_r])
    outline = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1).reshape(-1, 2)
    win = Win.full(size)
    canvas = np.zeros(win.shape, np.uint8)
    cv2.fillPoly(canvas, [win.fixed(outline)], 255, cv2.LINE_AA, SUBPIXEL_BITS)
    circle(canvas, win, centre, root_r, 255)
    circle(canvas, win, centre, bore_r, 0)
    for k in range(4):
        a = turn + k * np.pi / 2 + np.pi / 4
        circle(canvas, win, centre + 44 * s * np.array([np.cos(a), np.sin(a)]), 12 * s, 0)
    alpha = canvas.astype(np.float32) / 255.0

    yy, xx = coords(size)
    r, theta = np.hypot(xx - centre[0], yy - centre[1]), np.arctan2(yy - centre[1], xx - centre[0])
    light = rng.uniform(0, 2 * np.pi)
    raised = ((r > root_r - 10 * s) | (r < bore_r + 10 * s)).astype(np.float32)  # rim and hub stand proud of the web
    shade = 0.62 + 0.12 * raised + 0.06 * np.cos(theta - light) + 0.02 * np.sin(2 * np.pi * r / max(2.5 * s, 1.2))
    steel = shade[..., None] * np.float32([0.36, 0.40, 0.50])
    card = (0.70 + 0.02 * smooth_noise(rng, size, 5) + 0.025 * fine_noise(rng, size, 0.7, 0.7))[..., None]
    image = _on_background(card * np.float32([1.0, 0.82, 0.58]), steel, alpha, (2.5 * s, 3.5 * s), 6 * s, 0.45)
    return object_scene(image, lighting(rng, size), alpha, centre, contrast=1.5)
