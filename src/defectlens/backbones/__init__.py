"""Backbones: images in, patch features out. ``get_backbone`` builds one by name."""

from __future__ import annotations

from functools import lru_cache

from ..errors import UsageError
from .base import PatchBackbone, configure_threads
from .efficientnet_lite import VARIANTS as EFFICIENTNET_LITE_VARIANTS
from .efficientnet_lite import EfficientNetLite

DEFAULT_BACKBONE = "efficientnet-lite0"


def available_backbones() -> list[str]:
    """Names ``get_backbone`` accepts."""
    return sorted(EFFICIENTNET_LITE_VARIANTS)


def is_backbone_name(name) -> bool:
    """Whether ``get_backbone`` knows ``name`` (without loading anything)."""
    return isinstance(name, str) and name in EFFICIENTNET_LITE_VARIANTS


@lru_cache(maxsize=4)
def get_backbone(name: str = DEFAULT_BACKBONE, size: int = 256) -> PatchBackbone:
    """One shared instance per (name, size): loading weights once per process."""
    if name in EFFICIENTNET_LITE_VARIANTS:
        return EfficientNetLite(name, size)
    raise UsageError(f"unknown backbone '{name}'; available: {', '.join(available_backbones())}")


__all__ = ["DEFAULT_BACKBONE", "available_backbones", "is_backbone_name", "EfficientNetLite", "PatchBackbone", "configure_threads", "get_backbone"]
