"""The backbone interface: images in, a dense grid of patch features out.

Every detector talks to a backbone only through :class:`PatchBackbone`, so DINOv2 or CLIP
from ``transformers`` slot in behind the same two methods as the embedded EfficientNet-Lite.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.ahead import mapped_ahead
from ..data.io import as_image


def configure_threads() -> int:
    """Use every core we were given (CPU affinity, not the machine's count) for intra-op work."""
    wanted = int(os.environ.get("DEFECTLENS_THREADS", "0")) or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


class PatchBackbone:
    """Turns RGB uint8 images into patch features of shape (N, C, h, w).

    Subclasses set ``name``, ``mean``, ``std``, ``stride`` (input pixels per feature cell)
    and implement :meth:`forward` on a normalised float tensor.
    """

    name: str = "backbone"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    stride: int = 8
    batch_size: int = 2

    def __init__(self, size: int | tuple[int, int] = 256):
        self.input_hw = (size, size) if isinstance(size, int) else tuple(size)
        configure_threads()

    @property
    def feature_hw(self) -> tuple[int, int]:
        return (self.input_hw[0] // self.stride, self.input_hw[1] // self.stride)

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        """(channels, stride) of each level concatenated in the features, finest first; coarser
        levels are upsampled to the finest grid, which a method may undo to use them apart."""
        return ((self.feature_dim, self.stride),)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def resize(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 image -> uint8 at the input size (area interpolation: no aliasing)."""
        height, width = self.input_hw
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)

    def _prepare(self, item) -> np.ndarray:
        return self.resize(as_image(item))

    def to_tensor(self, resized: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> normalised float (N, 3, H, W). Done in torch on the whole
        batch, channels-last (a view of the NHWC array): oneDNN convolutions run about 13 %
        faster that way on a CPU than on NCHW, and no transposed copy is made."""
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).reshape(1, 3, 1, 1)
        offset = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).reshape(1, 3, 1, 1)
        return torch.from_numpy(resized).permute(0, 3, 1, 2).float().mul_(scale).add_(offset)

    def embed(self, images: Sequence | Iterable, progress: str | None = None, total: int | None = None) -> torch.Tensor:
        """Features for a list of images (arrays or paths), batched, without autograd."""
        batches, chunk = [], []
        # Decoded and resized in threads while the batch before runs forward.
        resized = mapped_ahead(self._prepare, images, ahead=2 * self.batch_size)
        items = tqdm(resized, desc=progress, total=total, unit="img", disable=progress is None, leave=False)
        with torch.inference_mode():
            for item in items:
                chunk.append(item)
                if len(chunk) == self.batch_size:
                    batches.append(self.forward(self.to_tensor(np.stack(chunk))))
                    chunk = []
            if chunk:
                batches.append(self.forward(self.to_tensor(np.stack(chunk))))
        if not batches:
            return torch.empty(0, self.feature_dim, *self.feature_hw)
        return torch.cat(batches)
