"""Wide residual network trunk, WRN-n-k (Zagoruyko & Komodakis, "Wide residual networks", BMVC 2016).

Layout for depth ``n`` and widen factor ``k`` (all channel counts x ``width``):

* stem (task-specific): 3x3 convolution to 16 channels, no BN/ReLU (the first block pre-activates it);
* three stages of ``m`` pre-activation basic blocks at 16k, 32k, 64k channels, strides 1/2/2. A block is
  ``BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3`` plus the shortcut. Where the shape changes, the shortcut
  is a 1x1 convolution (stride as the block) applied to the pre-activated input, as in the authors' code;
  it splits into the same units as the main path;
* final BN-ReLU, global average pooling: ``feature_channels = 64k``.

The depth counts layers as Zagoruyko & Komodakis do, ``n = 6m + 4`` (10, 16, 22, 28, 40). Deep Virtual
Networks and Deep Elastic Networks report a "WRN-32-4", which that rule does not produce; depths
``n = 6m + 2`` (14, 20, 26, 32, ...) are read as they count ResNet-n (first conv + 6m convs + FC), so
WRN-32-4 has ``m = 5`` blocks per stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import Backbone, Stem, scale_width
from virtnet.errors import ConfigError
from virtnet.nn import BatchNorm2d, Conv2d, Route, Routed, RouteSequential

if TYPE_CHECKING:
    from virtnet.backbones.registry import BackboneConfig


class PreActBlock(nn.Module, Routed):
    """Pre-activation basic block: ``conv2(drop(relu(bn2(conv1(a))))) + shortcut``, ``a = relu(bn1(x))``.

    The shortcut is ``x`` when the shape is kept, else a 1x1 convolution of ``a``.
    """

    #: (convolution, the batch norm that directly follows it): conv1 feeds bn2; bn1 comes before conv1
    CONV_NORM_PAIRS = (("conv1", "bn2"),)

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        a = F.relu(self.bn1(x, route))  # (B, C_in, H, W)
        out = F.relu(self.bn2(self.conv1(a, route), route))  # (B, C_out, H', W')
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        out = self.conv2(out, route)
        identity = x if self.shortcut is None else self.shortcut(a, route)
        return out + identity


class WideResNet(Backbone):
    """WRN-n-k trunk (see the module docstring).

    Args:
        depth: ``6m + 4`` (or ``6m + 2``, read as DVN's WRN-32-4).
        widen_factor: ``k``.
        width: multiplier of every channel count (``int(round(c * width))``, at least 1).
        input_size: the spatial side the trunk expects from stems.
        dropout: dropout probability between the two convolutions of each block.
        widths: explicit widths ``(stem, stage1, stage2, stage3)``, overriding ``widen_factor`` and
            ``width``.
    """

    default_depth = 16

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 4,
        width: float = 1.0,
        input_size: int = 32,
        dropout: float = 0.0,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        problem = self.depth_problem(depth)
        if problem:
            raise ConfigError(f"depth: {problem}")
        if widen_factor < 1:
            raise ConfigError(f"widen_factor: must be >= 1, got {widen_factor}")
        if width <= 0:
            raise ConfigError(f"width: must be > 0, got {width}")
        if widths is None:
            k = widen_factor
            widths = [scale_width(c, width) for c in (16, 16 * k, 32 * k, 64 * k)]
        elif len(widths) != 4 or any(int(c) < 1 for c in widths):
            raise ConfigError(f"widths: WRN needs 4 positive widths (stem, 3 stages), got {list(widths)}")
        self.depth = depth
        self.widen_factor = widen_factor
        self.widths = tuple(int(c) for c in widths)
        self.blocks_per_stage = (depth - 4) // 6 if (depth - 4) % 6 == 0 else (depth - 2) // 6
        self.in_channels = self.widths[0]
        self.feature_channels = self.widths[-1]
        self.input_size = input_size
        layers: list[nn.Module] = []
        prev = self.widths[0]
        for i, c in enumerate(self.widths[1:]):
            for j in range(self.blocks_per_stage):
                layers.append(PreActBlock(prev, c, (1 if i == 0 else 2) if j == 0 else 1, dropout))
                prev = c
        self.blocks = RouteSequential(*layers)
        self.bn = BatchNorm2d(prev)

    @classmethod
    def depth_problem(cls, depth: int, layout: str = "cifar") -> str | None:
        if depth < 8 or (depth - 4) % 6 not in (0, 4):
            return (
                f"WRN depth must be 6m+4 (10, 16, 22, 28, ...) or 6m+2 as in DVN's WRN-32-4 "
                f"(14, 20, 26, 32, ...), got {depth}"
            )
        return None

    @classmethod
    def from_config(cls, cfg: BackboneConfig, feature_size: int) -> WideResNet:
        return cls(
            depth=cfg.depth or cls.default_depth,
            widen_factor=cfg.widen_factor,
            width=cfg.width,
            input_size=feature_size,
            dropout=cfg.dropout,
        )

    def make_stem(self, in_channels: int, input_size: int) -> nn.Module:
        """3x3 convolution alone (stride by size): the first block's BN-ReLU pre-activates it."""
        return Stem(in_channels, input_size, self.in_channels, self.input_size, norm=False, relu=False)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        x = self.blocks(x, route)  # (B, C, H, W)
        x = F.relu(self.bn(x, route))
        return x.mean(dim=(2, 3))  # (B, C)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, widths={self.widths}, input_size={self.input_size}"


__all__ = ["PreActBlock", "WideResNet"]
