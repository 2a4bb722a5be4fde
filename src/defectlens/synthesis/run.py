"""Write synthetic anomalies made from a dataset's normal images to a folder (`defectlens synthesize`)."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import DatasetError, OutputError, OutputExistsError, UsageError
from . import KINDS, synthesizer_class

MANIFEST = "synthesis.json"
LEARNS_FROM_ANOMALIES = ("anogen", "diffusion")


def _check_params(kind: str, params: dict) -> None:
    accepted = [name for name in inspect.signature(synthesizer_class(kind).__init__).parameters if name != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UsageError(f"{kind} has no parameter {', '.join(unknown)}; it takes: {', '.join(accepted)}")


def _write_png(path: Path, pixels: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(pixels[..., ::-1] if pixels.ndim == 3 else pixels)):
        raise OutputError(f"could not write {path}")


def _earlier_output(out: Path, overwrite: bool) -> list[Path]:
    """What an earlier run left in ``out``; refused unless ``overwrite``."""
    ours = [out / "images", out / "masks", out / MANIFEST, out / "defect_embedding.safetensors"]
    existing = [path for path in ours if path.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} already exists; pass --overwrite (overwrite=True) to replace earlier output")
    return existing


def synthesize_folder(data: str | os.PathLike, out: str | os.PathLike, kind: str = "perlin", count: int = 16,
                      seed: int = 0, anomalies: int = 3, textures: str | os.PathLike | None = None,
                      params: dict | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``count`` anomalous images made from the normal images of ``data``; return the manifest.

    ``data``: a dataset folder (see :func:`defectlens.data.datasets.load_dataset`); its training
    images are the normal ones (a plain folder: all its images). anogen and diffusion learn from
    ``anomalies`` anomalous test images with masks, picked with ``seed``; the manifest lists them
    under ``held_out`` so an evaluation can leave them out. ``textures``: a folder of images for
    perlin. ``params``: synthesizer parameters. Writes ``out/images/NNNN.png``,
    ``out/masks/NNNN.png`` (0/255), ``out/synthesis.json`` (sources and boxes) and, for
    diffusion, the learned ``out/defect_embedding.safetensors``. The same arguments write the same files.
    """
    from defectlens.data.datasets import load_dataset
    from defectlens.data.io import is_image_file, read_image, read_mask

    if kind not in KINDS:
        raise UsageError(f"unknown synthesis kind {kind!r}; expected one of {', '.join(KINDS)}")
    if count < 1:
        raise UsageError(f"count must be at least 1, got {count}")
    kwargs = dict(params or {})
    _check_params(kind, kwargs)
    dataset = load_dataset(data)
    normals = [s.path for s in dataset.train if s.label == 0] or [s.path for s in dataset.test if s.label in (0, -1)]
    if not normals:
        raise DatasetError(f"{data}: no normal images to put anomalies into")
    rng = np.random.default_rng(seed)
    held_out: list[str] = []
    if kind in LEARNS_FROM_ANOMALIES:
        candidates = [s for s in dataset.test if s.label == 1 and s.mask_paths]
        if not candidates:
            raise DatasetError(f"{data}: no anomalous test images with masks; {kind} learns from a few of them")
        if anomalies < 1:
            raise UsageError(f"{kind} needs at least 1 anomaly example, got {anomalies}")
        chosen = [candidates[i] for i in sorted(rng.choice(len(candidates), min(anomalies, len(candidates)), replace=False))]
        images = [read_image(s.path) for s in chosen]
        masks = [np.any([read_mask(p, image.shape[:2]) for p in s.mask_paths], axis=0) for s, image in zip(chosen, images)]
        kwargs.update(anomaly_images=images, anomaly_masks=masks)
        held_out = [str(s.path) for s in chosen]
    if textures is not None:
        if kind != "perlin":
            raise UsageError("textures are for the perlin kind only")
        files = sorted(p for p in Path(textures).rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise DatasetError(f"{textures}: no texture images found")
        kwargs["textures"] = [read_image(p, max_side=512) for p in files]
    out = Path(out)
    earlier = _earlier_output(out, overwrite)
    synthesizer = synthesizer_class(kind)(**kwargs)  # may fail (missing weights): leave ``out`` untouched until built
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()

    order = rng.permutation(len(normals))
    foregrounds: dict[Path, np.ndarray] = {}
    items = []
    for i in tqdm(range(count), desc=f"synthesizing {kind}", disable=not progress):
        path = normals[order[i % len(normals)]]
        image = read_image(path)
        item_rng = np.random.default_rng([seed, i])  # each image reproducible on its own
        if kind in LEARNS_FROM_ANOMALIES or getattr(synthesizer, "on_foreground", False):
            if path not in foregrounds:
                from . import foreground_mask

                foregrounds[path] = foreground_mask(image)
            anomaly = synthesizer(image, item_rng, foreground=foregrounds[path])
        else:
            anomaly = synthesizer(image, item_rng)
        name = f"{i:04d}.png"
        _write_png(out / "images" / name, anomaly.image)
        _write_png(out / "masks" / name, anomaly.mask.astype(np.uint8) * 255)
        items.append({"image": f"images/{name}", "mask": f"masks/{name}", "normal": str(path),
                      "box": list(anomaly.box) if anomaly.box is not None else None})
    embedding = None
    if kind == "diffusion":  # keep what was learned: --param embedding=FILE reuses it
        from .diffusion import save_embedding

        embedding = "defect_embedding.safetensors"
        save_embedding(out / embedding, synthesizer.embedding)
    manifest = {"kind": kind, "seed": seed, "data": str(data), "count": count, "embedding": embedding,
                "params": {k: v for k, v in kwargs.items() if k not in ("anomaly_images", "anomaly_masks", "textures")},
                "textures": str(textures) if textures is not None else None,
                "held_out": held_out, "items": items}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
