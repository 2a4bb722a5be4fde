"""Anomaly maps from a patch grid to the image."""

from __future__ import annotations

import cv2
import numpy as np


def upsample_map(patch_map: np.ndarray, input_hw: tuple[int, int], shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Patch grid -> the model's input size, Gaussian smoothing (``sigma`` in input pixels, as
    PatchCore does; 0 for none) -> the image's own (height, width)."""
    smooth = cv2.resize(patch_map.astype(np.float32), (input_hw[1], input_hw[0]), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        smooth = cv2.GaussianBlur(smooth, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(smooth, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
