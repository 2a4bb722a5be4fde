"""Texture categories: a surface that fills the whole image, with defects anywhere inside a margin."""

from __future__ import annotations

import cv2
import numpy as np

from .defects import Scene, texture_scene
from .render import coords, fine_noise, lighting, smooth_noise


def fabric(rng: np.random.Generator, size: int) -> Scene:
    """Plain-weave canvas: warp and weft threads alternate over/under, with per-thread yarn
    variation, fibre noise, a random phase and a slight skew."""
    s = size / 256
    yy, xx = coords(size)
    pitch = max(9.0 * s, 3.0) * rng.uniform(0.97, 1.03)
    angle = np.deg2rad(rng.normal(0.0, 1.5))
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / pitch + rng.uniform(0, 2)
    v = (yy * np.cos(angle) - xx * np.sin(angle)) / pitch + rng.uniform(0, 2)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    warp_on_top = (iu + iv) % 2 == 0
    # A thread is brightest along its crown and dips where it passes under the crossing one.
    su, sv = np.sin(np.pi * fu), np.sin(np.pi * fv)
    warp = np.sqrt(su) * (0.7 + 0.3 * sv)
    weft = np.sqrt(sv) * (0.7 + 0.3 * su)
    warp *= rng.normal(1.0, 0.06, 64)[iu.astype(np.int64) % 64] * (1 + 0.12 * fine_noise(rng, size, 0.6 * s, 3 * s))
    weft *= rng.normal(1.0, 0.06, 64)[iv.astype(np.int64) % 64] * (1 + 0.12 * fine_noise(rng, size, 3 * s, 0.6 * s))
    tint = rng.normal(1.0, 0.015, 3)
    warp_colour, weft_colour = np.float32([0.56, 0.50, 0.41]) * tint, np.float32([0.66, 0.61, 0.52]) * tint
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    mottle = 1.0 + 0.03 * smooth_noise(rng, size, 5)
    image = ((0.3 + 0.7 * np.where(warp_on_top, warp, weft)) * mottle)[..., None] * colour
    return texture_scene(image.astype(np.float32), lighting(rng, size), contrast=1.5)


def brushed_metal(rng: np.random.Generator, size: int) -> Scene:
    """Brushed steel: long parallel grain, a broad sheen across it, a slight random tilt."""
    s = size / 256
    pad = size // 8
    n = size + 2 * pad
    # Noise stretched 16× along x reads as brushing marks; a fine layer adds short scratches.
    grain = rng.standard_normal((n, max(n // 16, 4))).astype(np.float32)
    grain = cv2.resize(grain, (n, n), interpolation=cv2.INTER_CUBIC)
    grain = 0.7 * grain / grain.std() + 0.3 * fine_noise(rng, n, 5 * s, 0.5 * s)
    tilt = cv2.getRotationMatrix2D((n / 2, n / 2), rng.normal(0.0, 1.5), 1.0)
    tilt[:, 2] -= pad
    grain = cv2.warpAffine(grain, tilt, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    yy, xx = coords(size)
    sheen = np.exp(-(((xx - rng.uniform(0.2, 0.8) * size) / (0.35 * size)) ** 2))
    shade = 0.50 + 0.045 * grain + 0.10 * sheen
    image = shade[..., None] * (np.float32([0.97, 1.0, 1.05]) * rng.normal(1.0, 0.01, 3).astype(np.float32))
    return texture_scene(image.astype(np.float32), lighting(rng, size))




def wood(rng: np.random.Generator, size: int) -> Scene:
    """Planed wood: growth rings as warped stripes along the board, darker latewood bands and fine
    pores drawn out along the grain; ring phase, warp and board angle vary."""
    s = size / 256
    yy, xx = coords(size)
    angle = np.deg2rad(rng.normal(0.0, 4.0))
    across = yy * np.cos(angle) - xx * np.sin(angle)
    warp = 20 * s * smooth_noise(rng, size, 3) + 5 * s * smooth_noise(rng, size, 8)
    pitch = 15 * s * rng.uniform(0.9, 1.1)
    ring = 0.5 + 0.5 * np.sin(2 * np.pi * (across + warp) / pitch + rng.uniform(0, 2 * np.pi))
    latewood = ring**4  # narrow dark bands, wide light earlywood
    pores = fine_noise(rng, size, 8 * s, 0.5 * s)
    shade = (1 - 0.32 * latewood) * (1 + 0.05 * pores) * (1 + 0.04 * smooth_noise(rng, size, 4))
    colour = np.float32([0.78, 0.55, 0.32]) * rng.normal(1.0, 0.02, 3).astype(np.float32)
    return texture_scene((shade[..., None] * colour).astype(np.float32), lighting(rng, size), contrast=1.3)


def tiles(rng: np.random.Generator, size: int) -> Scene:
    """Glazed pale-blue square tiles in a grey grout grid: each tile a slightly different shade,
    bevelled edges and a soft glare; the grid's offset and a slight twist vary."""
    s = size / 256
    yy, xx = coords(size)
    pitch = 64 * s * rng.uniform(0.97, 1.03)
    angle = np.deg2rad(rng.normal(0.0, 1.0))
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / pitch + rng.uniform(0, 1)
    v = (yy * np.cos(angle) - xx * np.sin(angle)) / pitch + rng.uniform(0, 1)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    joint = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) * pitch  # px to the nearest joint
    half_grout = max(2.5 * s, 1.0)
    grout = np.clip(half_grout + 0.5 - joint, 0, 1)  # one anti-aliased pixel at the tile edge
    bevel = np.clip(1 - (joint - half_grout) / max(5 * s, 1.5), 0, 1)
    shade_of_tile = rng.normal(1.0, 0.025, (32, 32)).astype(np.float32)
    tile_shade = shade_of_tile[iu.astype(np.int64) % 32, iv.astype(np.int64) % 32]
    glare_at = rng.uniform(0.2, 0.8, 2) * size
    glare = np.exp(-((xx - glare_at[0]) ** 2 + (yy - glare_at[1]) ** 2) / (0.3 * size) ** 2)
    glaze = (tile_shade * (1 - 0.15 * bevel) + 0.08 * glare)[..., None] * np.float32([0.74, 0.84, 0.92])
    mortar = (0.45 + 0.03 * fine_noise(rng, size, 1.0, 1.0))[..., None] * np.float32([1.0, 0.97, 0.92])
    image = glaze * (1 - grout[..., None]) + mortar * grout[..., None]
    return texture_scene(image.astype(np.float32), lighting(rng, size))


def leaf(rng: np.random.Generator, size: int) -> Scene:
    """Close-up of a leaf blade: a pale midrib, side veins slanting towards the tip, a fine vein
    network and cell mottling; midrib angle and position vary."""
    s = size / 256
    yy, xx = coords(size)
    angle = np.deg2rad(45 + rng.normal(0.0, 10.0))
    origin = (size - 1) / 2 + rng.normal(0.0, 12 * s, 2)
    along = (xx - origin[0]) * np.cos(angle) + (yy - origin[1]) * np.sin(angle)
    across = (yy - origin[1]) * np.cos(angle) - (xx - origin[0]) * np.sin(angle)
    midrib = np.exp(-((across / max(3.5 * s, 1.2)) ** 2))
    pitch = 30 * s * rng.uniform(0.9, 1.1)
    t = (along - 0.9 * np.abs(across)) / pitch + rng.uniform(0, 1)
    side = np.exp(-(((t - np.round(t)) * pitch / max(1.6 * s, 0.8)) ** 2))
    network = np.exp(-((fine_noise(rng, size, 2.5 * s, 2.5 * s) / 0.18) ** 2))
    veins = np.clip(midrib + 0.7 * side + 0.25 * network, 0, 1)[..., None]
    blade = (1 + 0.08 * smooth_noise(rng, size, 6) + 0.04 * fine_noise(rng, size, 1.2 * s, 1.2 * s))[..., None]
    blade = blade * np.float32([0.22, 0.45, 0.14])
    image = blade * (1 - veins) + np.float32([0.46, 0.64, 0.28]) * veins
    return texture_scene(image.astype(np.float32), lighting(rng, size), contrast=1.4)


def leather(rng: np.random.Generator, size: int) -> Scene:
    """Pebbled oxblood leather: rounded grains (cells of a jittered grid) parted by dark creases,
    with a broad sheen; the grain pattern differs in every image."""
    s = size / 256
    yy, xx = coords(size)
    cell = max(9 * s * rng.uniform(0.95, 1.05), 3.0)
    n = int(size / cell) + 3
    seeds = rng.uniform(0.1, 0.9, (n, n, 2))
    gx, gy = xx / cell + rng.uniform(0, 1), yy / cell + rng.uniform(0, 1)
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    nearest = np.full(gx.shape, np.inf, np.float32)
    second = np.full(gx.shape, np.inf, np.float32)
    for dy in (-1, 0, 1):  # the nearest two grain centres lie in the 3×3 neighbouring cells
        for dx in (-1, 0, 1):
            cx, cy = ix + dx, iy + dy
            seed = seeds[cy % n, cx % n]
            d = np.hypot(gx - (cx + seed[..., 0]), gy - (cy + seed[..., 1])).astype(np.float32)
            second = np.where(d < nearest, nearest, np.minimum(second, d))
            nearest = np.minimum(nearest, d)
    crease = np.exp(-(((second - nearest) / 0.12) ** 2))
    dome = np.sqrt(np.clip(1 - nearest / 0.9, 0, 1))
    sheen = np.exp(-(((xx + yy) / 2 - rng.uniform(0.2, 0.8) * size) / (0.4 * size)) ** 2)
    shade = (0.75 + 0.2 * dome + 0.1 * sheen) * (1 - 0.45 * crease) * (1 + 0.03 * fine_noise(rng, size, 0.7, 0.7))
    colour = np.float32([0.46, 0.17, 0.12]) * rng.normal(1.0, 0.02, 3).astype(np.float32)
    return texture_scene((shade[..., None] * colour).astype(np.float32), lighting(rng, size), contrast=1.5)


def perforated_metal(rng: np.random.Generator, size: int) -> Scene:
    """Perforated steel sheet: round holes on a staggered grid, dark behind, each with a bright
    punched rim, over a faint rolling texture and a broad sheen; the sheet shifts and twists
    slightly. Defects stay on the metal."""
    s = size / 256
    yy, xx = coords(size)
    pitch = max(26 * s, 10.0) * rng.uniform(0.98, 1.02)  # small images keep room for defects between holes
    hole_r = 0.3 * pitch
    row = pitch * np.sqrt(3)  # the vertical period of a hexagonal lattice with spacing ``pitch``
    angle = np.deg2rad(rng.normal(0.0, 1.5))
    u = xx * np.cos(angle) + yy * np.sin(angle) + rng.uniform(0, pitch)
    v = yy * np.cos(angle) - xx * np.sin(angle) + rng.uniform(0, row)
    # nearest hole centre: the lattice is two rectangular ones, the second shifted by half a period
    d = np.minimum(np.hypot(u % pitch - pitch / 2, v % row - row / 2),
                   np.hypot((u + pitch / 2) % pitch - pitch / 2, (v + row / 2) % row - row / 2))
    hole = np.clip(hole_r + 0.5 - d, 0, 1).astype(np.float32)
    rim = np.exp(-(((d - hole_r) / max(1.5 * s, 0.8)) ** 2))
    sheen = np.exp(-(((xx - yy) / 2 - rng.uniform(-0.3, 0.3) * size) / (0.45 * size)) ** 2)
    sheet = 0.56 + 0.02 * fine_noise(rng, size, 4 * s, 0.6 * s) + 0.12 * sheen + 0.12 * rim
    metal = sheet[..., None] * np.float32([0.95, 0.98, 1.03])
    behind = np.float32([0.07, 0.07, 0.08])
    image = metal * (1 - hole[..., None]) + behind * hole[..., None]
    margin = max(2, int(0.1 * size))
    sites = np.zeros((size, size), bool)
    sites[margin:-margin, margin:-margin] = True
    sites &= cv2.erode((hole == 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return Scene(image.astype(np.float32), lighting(rng, size), 1 - hole, sites, sites, contrast=1.2)
