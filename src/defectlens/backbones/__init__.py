"""Backbones: images in, patch features out. ``get_backbone`` builds one by name."""

from __future__ import annotations

from functools import lru_cache

from ..errors import UsageError
from .base import PatchBackbone, configure_threads
from .efficientnet_lite import VARIANTS as EFFICIENTNET_LITE_VARIANTS
from .efficientnet_lite import EfficientNetLite

DEFAULT_BACKBONE = "efficientnet-lite0"


@lru_cache(maxsize=4)
def get_backbone(name: str = DEFAULT_BACKBONE, size: int = 256) -> PatchBackbone:
    """One shared instance per (name, size): loading weights once per process."""
    if name in EFFICIENTNET_LITE_VARIANTS:
        return EfficientNetLite(name, size)
    raise UsageError(f"unknown backbone '{name}'; available: {', '.join(sorted(EFFICIENTNET_LITE_VARIANTS))}")


__all__ = ["DEFAULT_BACKBONE", "EfficientNetLite", "PatchBackbone", "configure_threads", "get_backbone"]
