"""ResNet-26 of the residual adapters (Rebuffi et al., "Efficient parametrization of multi-domain deep
neural networks", CVPR 2018, Sec. 3.2; the network of "Learning multiple visual domains with residual
adapters", NIPS 2017), for 64x64 inputs (the Visual Decathlon's 72-pixel images, cropped to 64).

The paper: "3 macro-blocks of convolutional layers, each outputting 64, 128 and 256 feature channels.
Each macro-block contains 4 residual blocks each, each of which consists of two convolutional layers using
3x3 filters and a skip connection. The resolution of the data is halved from a macro-block to the next
using average pooling." It does not describe the first layer; our reading, which agrees with the authors'
released code:

* stem (per task): 3x3 convolution to 32 channels (x width), stride 1 for 64x64 inputs (by size
  otherwise), then BN; no ReLU (the first block's convolution reads the BN output);
* three stages of four post-activation basic blocks (conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU) at
  64/128/256 channels (x width); every stage, the first included, opens with stride 2, so 64x64 inputs
  end at 8x8. 1 + 3 x 4 x 2 = 25 convolutions plus the classifier: 26 layers;
* final BN + ReLU, global average pooling: ``feature_channels = 256 x width``.

Downsampling: the main path's first convolution has stride 2 and the shortcut halves the resolution with
2x2 average pooling. The authors' code then pads the pooled shortcut with zero channels (32 -> 64); we
follow the pooling with a 1x1 convolution + BN projection instead, so that the shortcut splits into the
same units as the main path (a zero-padded shortcut puts all of the input's units in the first half of
the output's channels, which no unit partition respects).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import Backbone, Stem, scale_width
from virtnet.backbones.resnet import make_stage
from virtnet.errors import ConfigError
from virtnet.nn import BatchNorm2d, Route, RouteSequential

if TYPE_CHECKING:
    from virtnet.backbones.registry import BackboneConfig


class ResNet26(Backbone):
    """ResNet-26 trunk (see the module docstring).

    Args:
        width: multiplier of every channel count (``int(round(c * width))``, at least 1).
        input_size: the spatial side the trunk expects from stems (64 in the paper).
        dropout: dropout probability between the two convolutions of each block (the paper's
            regularisation experiment places it before the second convolution, as in WRN).
        widths: explicit widths ``(stem, stage1, stage2, stage3)``, overriding ``width``.
    """

    default_depth = 26

    def __init__(
        self,
        width: float = 1.0,
        input_size: int = 64,
        dropout: float = 0.0,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ConfigError(f"width: must be > 0, got {width}")
        if widths is None:
            widths = [scale_width(c, width) for c in (32, 64, 128, 256)]
        elif len(widths) != 4 or any(int(c) < 1 for c in widths):
            raise ConfigError(f"widths: ResNet-26 needs 4 positive widths (stem, stages), got {list(widths)}")
        self.widths = tuple(int(c) for c in widths)
        self.in_channels = self.widths[0]
        self.feature_channels = self.widths[-1]
        self.input_size = input_size
        layers: list[nn.Module] = []
        prev = self.widths[0]
        for c in self.widths[1:]:
            layers += make_stage(prev, c, 4, 2, dropout, pool_shortcut=True)
            prev = c
        self.blocks = RouteSequential(*layers)
        self.bn = BatchNorm2d(prev)

    @classmethod
    def depth_problem(cls, depth: int, layout: str = "cifar") -> str | None:
        if depth != 26:
            return f"resnet26 has a fixed depth of 26; leave depth unset, got {depth}"
        return None

    @classmethod
    def from_config(cls, cfg: BackboneConfig, feature_size: int) -> ResNet26:
        return cls(width=cfg.width, input_size=feature_size, dropout=cfg.dropout)

    def make_stem(self, in_channels: int, input_size: int) -> nn.Module:
        """3x3 convolution (stride by size) + BN, no ReLU, as in the authors' code."""
        return Stem(in_channels, input_size, self.in_channels, self.input_size, relu=False)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        x = self.blocks(x, route)  # (B, C, H/8, W/8)
        x = F.relu(self.bn(x, route))
        return x.mean(dim=(2, 3))  # (B, C)

    def extra_repr(self) -> str:
        return f"widths={self.widths}, input_size={self.input_size}"


__all__ = ["ResNet26"]
