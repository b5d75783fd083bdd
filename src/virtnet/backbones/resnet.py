"""ResNet trunks (He et al., "Deep residual learning for image recognition", CVPR 2016).

Two layouts of post-activation basic blocks (conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU):

* ``cifar``: depth ``6n + 2`` (20, 32, 44, 56, 110), three stages of ``n`` blocks at 16/32/64 channels
  (x width), strides 1/2/2. The first 3x3 convolution (16 channels) is the task's stem.
* ``imagenet``: four stages at 64/128/256/512 channels (x width), strides 1/2/2/2, with block counts by
  depth 10: [1,1,1,1], 18: [2,2,2,2], 34: [3,4,6,3], 42: [5,5,5,5] (the ResNet-42 of Deep Virtual
  Networks, Kim et al. 2019, and of Deep Elastic Networks, Kim et al. 2019). The stem is the ImageNet
  one (7x7 convolution, BN, ReLU, 3x3 max-pool), its strides chosen by the task's input size
  (:class:`~virtnet.backbones.base.Stem` with ``max_pool=True``).

Where a block changes the shape, the shortcut is a 1x1 convolution + BN projection ("option B"): it splits
into the same units as the main path, so residual sums stay consistent when a route runs a subset of
units. Global average pooling ends the trunk: ``feature_channels`` is the last stage's width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import Backbone, Stem, conv_bn, scale_width
from virtnet.errors import ConfigError
from virtnet.nn import Route, Routed, RouteSequential

if TYPE_CHECKING:
    from virtnet.backbones.registry import BackboneConfig

CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
IMAGENET_BLOCKS: Mapping[int, tuple[int, ...]] = MappingProxyType(
    {
        10: (1, 1, 1, 1),
        18: (2, 2, 2, 2),
        34: (3, 4, 6, 3),
        42: (5, 5, 5, 5),
    }
)
IMAGENET_DEFAULT_DEPTH = 18
LAYOUTS = ("cifar", "imagenet")


class BasicBlock(nn.Module, Routed):
    """Post-activation basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of ``conv1`` (and of the shortcut).
        dropout: dropout probability between the two convolutions (0: none).
        pool_shortcut: downsample the shortcut by 2x2 average pooling before its 1x1 convolution (as
            ResNet-26 of the residual adapters halves resolution "using average pooling") instead of a
            strided 1x1 convolution.
    """

    #: (convolution, the batch norm that directly follows it): for fusions (see nn.adapters.conv_bn_pairs)
    CONV_NORM_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dropout: float = 0.0,
        pool_shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, out_channels, stride)
        self.conv2, self.bn2 = conv_bn(out_channels, out_channels)
        self.dropout = dropout
        self.shortcut: RouteSequential | None = None
        if stride != 1 or in_channels != out_channels:
            if pool_shortcut:
                conv, bn = conv_bn(in_channels, out_channels, 1, kernel=1)
                pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                self.shortcut = RouteSequential(*([pool] if stride > 1 else []), conv, bn)
            else:
                self.shortcut = RouteSequential(*conv_bn(in_channels, out_channels, stride, kernel=1))

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x, route), route))  # (B, C_out, H', W')
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        out = self.bn2(self.conv2(out, route), route)
        identity = x if self.shortcut is None else self.shortcut(x, route)
        return F.relu(out + identity)


def make_stage(
    in_channels: int,
    out_channels: int,
    blocks: int,
    stride: int,
    dropout: float = 0.0,
    pool_shortcut: bool = False,
) -> list[BasicBlock]:
    """``blocks`` basic blocks; the first one takes the stride and the change of width."""
    layers = [BasicBlock(in_channels, out_channels, stride, dropout, pool_shortcut)]
    layers += [BasicBlock(out_channels, out_channels, 1, dropout, pool_shortcut) for _ in range(blocks - 1)]
    return layers


class ResNet(Backbone):
    """ResNet trunk in the CIFAR or the ImageNet layout (see the module docstring).

    Args:
        depth: CIFAR: ``6n + 2``; ImageNet: 10, 18, 34 or 42.
        layout: ``"cifar"`` or ``"imagenet"``.
        width: multiplier of every channel count (``int(round(c * width))``, at least 1).
        input_size: the spatial side the trunk expects from stems (default 32 for CIFAR, 16 for
            ImageNet: the 16x16 maps the ImageNet stem makes of 64x64 Tiny-ImageNet images).
        widths: explicit stage widths (3 for CIFAR, 4 for ImageNet), overriding ``width``.
        dropout: dropout probability between the two convolutions of each block.
    """

    default_depth = 20

    def __init__(
        self,
        depth: int = 20,
        layout: str = "cifar",
        width: float = 1.0,
        input_size: int | None = None,
        widths: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ConfigError(f"layout: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        problem = self.depth_problem(depth, layout)
        if problem:
            raise ConfigError(f"depth: {problem}")
        if width <= 0:
            raise ConfigError(f"width: must be > 0, got {width}")
        base = CIFAR_WIDTHS if layout == "cifar" else IMAGENET_WIDTHS
        if widths is None:
            widths = [scale_width(c, width) for c in base]
        elif len(widths) != len(base) or any(int(c) < 1 for c in widths):
            raise ConfigError(
                f"widths: ResNet {layout} needs {len(base)} positive stage widths, got {list(widths)}"
            )
        self.depth = depth
        self.layout = layout
        self.widths = tuple(int(c) for c in widths)
        counts = (depth - 2) // 6
        self.block_counts = (counts,) * 3 if layout == "cifar" else IMAGENET_BLOCKS[depth]
        self.in_channels = self.widths[0]
        self.feature_channels = self.widths[-1]
        self.input_size = input_size if input_size is not None else (32 if layout == "cifar" else 16)
        layers: list[nn.Module] = []
        prev = self.widths[0]
        for i, (c, n) in enumerate(zip(self.widths, self.block_counts, strict=True)):
            layers += make_stage(prev, c, n, 1 if i == 0 else 2, dropout)
            prev = c
        self.blocks = RouteSequential(*layers)

    @classmethod
    def depth_problem(cls, depth: int, layout: str = "cifar") -> str | None:
        if layout == "imagenet":
            if depth not in IMAGENET_BLOCKS:
                known = ", ".join(str(d) for d in IMAGENET_BLOCKS)
                return f"ResNet ImageNet depth must be one of {known}, got {depth}"
            return None
        if depth < 8 or (depth - 2) % 6 != 0:
            return f"ResNet CIFAR depth must be 6n+2 (20, 32, 44, ...), got {depth}"
        return None

    @classmethod
    def from_config(cls, cfg: BackboneConfig, feature_size: int) -> ResNet:
        depth = cfg.depth or (cls.default_depth if cfg.layout == "cifar" else IMAGENET_DEFAULT_DEPTH)
        return cls(
            depth=depth, layout=cfg.layout, width=cfg.width, input_size=feature_size, dropout=cfg.dropout
        )

    def make_stem(self, in_channels: int, input_size: int) -> nn.Module:
        """CIFAR: 3x3 conv + BN + ReLU. ImageNet: 7x7 conv + BN + ReLU + 3x3 max-pool (strides by size)."""
        if self.layout == "imagenet":
            return Stem(in_channels, input_size, self.in_channels, self.input_size, kernel=7, max_pool=True)
        return Stem(in_channels, input_size, self.in_channels, self.input_size)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        x = self.blocks(x, route)  # (B, C, H, W)
        return x.mean(dim=(2, 3))  # (B, C)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, layout={self.layout}, widths={self.widths}, input_size={self.input_size}"


__all__ = ["BasicBlock", "ResNet", "make_stage"]
