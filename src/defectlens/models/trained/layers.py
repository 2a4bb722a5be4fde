"""Network building blocks shared by the trained detectors' networks."""

from __future__ import annotations

import torch


def conv_block(channels_in: int, channels_out: int, dilation: int = 1) -> torch.nn.Sequential:
    """Two 3×3 convolutions with batch norm and ReLU: the unit of every network here."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels_in, channels_out, 3, padding=dilation, dilation=dilation, bias=False),
        torch.nn.BatchNorm2d(channels_out), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(channels_out, channels_out, 3, padding=dilation, dilation=dilation, bias=False),
        torch.nn.BatchNorm2d(channels_out), torch.nn.ReLU(inplace=True),
    )
