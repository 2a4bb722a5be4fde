"""Backbones: images in, patch features out. ``get_backbone`` builds one by name."""

from __future__ import annotations

from functools import lru_cache

from ..errors import UsageError
from .base import PatchBackbone, configure_threads
from .dinov2 import DINOv2, is_dinov2_name, resolved_name
from .efficientnet_lite import VARIANTS as EFFICIENTNET_LITE_VARIANTS
from .efficientnet_lite import EfficientNetLite, is_efficientnet_lite_name

DEFAULT_BACKBONE = "efficientnet-lite0"


def available_backbones() -> list[str]:
    """Names ``get_backbone`` accepts (DINOv2 as its pattern)."""
    return [*(f"{variant}[@STAGES]" for variant in sorted(EFFICIENTNET_LITE_VARIANTS)), "dinov2[:MODEL][@LAYERS]"]


def is_backbone_name(name) -> bool:
    """Whether ``get_backbone`` knows ``name`` (without loading anything)."""
    return isinstance(name, str) and (is_efficientnet_lite_name(name) or is_dinov2_name(name))


def get_backbone(name: str = DEFAULT_BACKBONE, size: int | tuple[int, int] = 256) -> PatchBackbone:
    """The backbone called ``name`` at input ``size``: an EfficientNet-Lite variant, or
    ``dinov2[:MODEL][@LAYERS]`` (see backbones.dinov2). One shared instance per (name, size)."""
    if is_dinov2_name(name):
        return _build(resolved_name(name), size)
    if name.partition("@")[0] in EFFICIENTNET_LITE_VARIANTS:
        return _build(name, size)  # EfficientNetLite says what is wrong with the stages
    raise UsageError(f"unknown backbone '{name}'; available: {', '.join(available_backbones())}")


@lru_cache(maxsize=4)
def _build(name: str, size: int | tuple[int, int]) -> PatchBackbone:
    """Loading weights once per process."""
    return DINOv2(name, size) if is_dinov2_name(name) else EfficientNetLite(name, size)


__all__ = ["DEFAULT_BACKBONE", "DINOv2", "EfficientNetLite", "PatchBackbone", "available_backbones", "configure_threads",
           "get_backbone", "is_backbone_name", "is_efficientnet_lite_name"]
