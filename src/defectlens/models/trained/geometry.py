"""The working resolution of trained detectors: about ``size``² pixels at the image's aspect ratio
(so small defects stay round), each side a multiple of 32 because the U-Nets halve it five times."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

MULTIPLE = 32


def working_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with about ``size``² pixels, the image's aspect ratio, each a multiple of 32."""
    scale = size / math.sqrt(height * width)
    return (max(MULTIPLE, round(height * scale / MULTIPLE) * MULTIPLE),
            max(MULTIPLE, round(width * scale / MULTIPLE) * MULTIPLE))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    interpolation = cv2.INTER_AREA if shape[0] < image.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation)


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """RGB uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255.0
