"""Synthetic anomalies for training detectors that learn from defects (DRAEM, DeSTSeg, ...).

Every synthesizer is called as ``synthesizer(image, rng)`` on an RGB uint8 image with a
``numpy.random.Generator`` and returns a :class:`SyntheticAnomaly` (image, mask, box, kind); the
same generator state gives the same anomaly.

- ``perlin``: Perlin-noise blobs filled with a foreign texture (DRAEM)
- ``cutpaste``: a jittered patch or scar of the image pasted elsewhere (CutPaste)
- ``anogen``: real defects from a few anomaly examples placed on the object (AnoGen-style)
- ``diffusion``: AnoGen proper: a learned defect embedding steers Stable Diffusion inside a box
  (needs local Stable Diffusion weights; see :mod:`defectlens.synthesis.diffusion`)
"""

from __future__ import annotations

from .anogen import AnoGenSynthesizer, extract_defects
from .base import (
    SyntheticAnomaly,
    box_mask,
    foreground_mask,
    foreground_overlap,
    mask_box,
)
from .cutpaste import CutPasteSynthesizer
from .perlin import PerlinSynthesizer, perlin_noise, procedural_texture

KINDS = ("perlin", "cutpaste", "anogen", "diffusion")


def synthesizer_class(kind: str) -> type:
    """The class behind ``kind`` (the diffusion one is imported only when asked for)."""
    if kind == "diffusion":
        from .diffusion import DiffusionSynthesizer

        return DiffusionSynthesizer
    classes = {"perlin": PerlinSynthesizer, "cutpaste": CutPasteSynthesizer, "anogen": AnoGenSynthesizer}
    if kind not in classes:
        raise ValueError(f"unknown synthesis kind {kind!r}; expected one of {', '.join(KINDS)}")
    return classes[kind]


def create_synthesizer(kind: str, **kwargs):
    """The synthesizer named ``kind`` built with ``kwargs`` (its constructor's parameters)."""
    return synthesizer_class(kind)(**kwargs)


__all__ = [
    "KINDS",
    "AnoGenSynthesizer",
    "CutPasteSynthesizer",
    "PerlinSynthesizer",
    "SyntheticAnomaly",
    "box_mask",
    "create_synthesizer",
    "extract_defects",
    "foreground_mask",
    "foreground_overlap",
    "mask_box",
    "perlin_noise",
    "procedural_texture",
    "synthesizer_class",
]
