"""The two trained networks of GCAD, sized for a CPU.

``Student``: unpadded convolutions, so each output cell sees exactly the patch (48×48 pixels by
default) centred on its 8×8 cell and nothing else: it can be trained on crops and run on whole images
with the same result. GCAD has two: the local student regresses the teacher, the global student
regresses the autoencoder. (One trunk with two heads learnt the local target markedly slower.)

``GlobalRegressor``: the paper's global regression network, a U-Net-style encoder-decoder with
skip connections over the whole image (down to stride 32 and back to the stride-8 grid). It has
no bottleneck that would force it to abstract the scene, but it sees far beyond one patch, so it
learns what the autoencoder makes of a normal scene from the image around each cell.

``AutoEncoder``: the whole image (at 128 px) squeezed through a small vector, then decoded to
the teacher's feature grid. The bottleneck can hold the layout of a normal scene but not the
details of one image, so it reproduces what a normal scene would look like at every cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Side of the autoencoder's input: enough for the layout of a scene, cheap to encode.
AE_INPUT = 128


def block(channels: int, out: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    """Convolution, batch norm, ReLU. Batch norm makes the networks learn in the few hundred steps
    a CPU affords (several times faster than without, in our runs); at prediction it is a fixed
    per-channel affine map, so the student's cells stay independent of each other."""
    return [nn.Conv2d(channels, out, kernel, stride=stride, padding=padding, bias=False), nn.BatchNorm2d(out),
            nn.ReLU(inplace=True)]


class Student(nn.Module):
    def __init__(self, dims: int, width: int = 32, receptive_field: int = 48):
        """``receptive_field``: side of the patch one output cell sees, 16 px plus 16 per 3×3
        convolution at stride 8 (48 = two of them)."""
        super().__init__()
        if receptive_field < 32 or receptive_field % 16:
            raise ValueError(f"receptive_field must be a multiple of 16 from 32 up, not {receptive_field}")
        #: Border to add around an image (or a crop) so that its output grid has exactly one
        #: cell per 8×8 pixels, each centred on its cell.
        self.pad = (receptive_field - 8) // 2
        wide = 2 * width
        stride8 = [layer for _ in range(receptive_field // 16 - 1) for layer in block(wide, wide, 3)]
        self.layers = nn.Sequential(
            nn.PixelUnshuffle(4),  # 4×4 pixels -> 48 channels: stride 4 for free
            *block(48, width, 1),
            *block(width, width, 3),  # 12 px
            *block(width, wide, 2, stride=2),  # 16 px, stride 8
            *stride8,  # +16 px each
            nn.Conv2d(wide, dims, 1),
        )

    def padded(self, images: torch.Tensor) -> torch.Tensor:
        """Zero padding (mid-grey after normalisation), like the teacher's own: the border is
        unmistakable, so border cells can learn the teacher's border effects."""
        return F.pad(images, (self.pad,) * 4)

    def forward(self, padded: torch.Tensor) -> torch.Tensor:
        """(N, 3, 8h + 2 pad, 8w + 2 pad) padded images -> (N, dims, h, w)."""
        return self.layers(padded)


class GlobalRegressor(nn.Module):
    def __init__(self, dims: int, width: int = 32):
        super().__init__()
        wide = 2 * width
        self.stem = nn.Sequential(nn.PixelUnshuffle(4), *block(48, width, 1), *block(width, width, 3, padding=1))  # /4
        self.down = nn.ModuleList([nn.Sequential(*block(width, wide, 3, stride=2, padding=1)),  # /8
                                   nn.Sequential(*block(wide, wide, 3, stride=2, padding=1)),  # /16
                                   nn.Sequential(*block(wide, wide, 3, stride=2, padding=1))])  # /32
        # Each decoder level reads the upsampled coarser level next to the encoder's skip at its own stride.
        self.up = nn.ModuleList([nn.Sequential(*block(2 * wide, wide, 3, padding=1)) for _ in range(2)])
        self.out = nn.Conv2d(wide, dims, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 8h, 8w) whole images -> (N, dims, h, w) on the stride-8 grid."""
        skips, hidden = [], self.stem(images)
        for layer in self.down:
            hidden = layer(hidden)
            skips.append(hidden)
        hidden = skips.pop()
        for layer in self.up:
            skip = skips.pop()
            hidden = F.interpolate(hidden, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            hidden = layer(torch.cat([hidden, skip], dim=1))
        return self.out(hidden)


class AutoEncoder(nn.Module):
    def __init__(self, dims: int, bottleneck: int = 64, width: int = 32):
        super().__init__()
        wide = 2 * width
        layers, channels = [], 3
        for out in (width, width, wide, wide, wide):  # 128 -> 4 px
            layers += block(channels, out, 4, stride=2, padding=1)
            channels = out
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(wide * 16, bottleneck))
        self.expand = nn.Sequential(nn.Linear(bottleneck, wide * 16), nn.ReLU(inplace=True))
        self.decoder = nn.ModuleList(nn.Sequential(*block(wide, wide, 3, padding=1)) for _ in range(3))
        self.out = nn.Conv2d(wide, dims, 1)

    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, 3, H, W) -> (N, dims, *grid), each cell decoded from one small vector per image."""
        small = F.interpolate(images, size=(AE_INPUT, AE_INPUT), mode="bilinear", antialias=True, align_corners=False)
        hidden = self.expand(self.encoder(small)).view(len(images), -1, 4, 4)
        height, width = grid
        for step, layer in enumerate(self.decoder):
            scale = 2 ** (len(self.decoder) - 1 - step)  # grid/4, grid/2, grid
            size = (max(4, -(-height // scale)), max(4, -(-width // scale)))
            hidden = layer(F.interpolate(hidden, size=size, mode="bilinear", align_corners=False))
        return self.out(hidden)
