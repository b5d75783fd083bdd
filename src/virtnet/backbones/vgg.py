"""VGG trunks with batch norm, CIFAR style (Simonyan & Zisserman, ICLR 2015; as used by Deep Elastic
Networks for network compression on CIFAR).

Configurations (channels before x ``width``; ``M`` = 2x2 max-pool)::

    VGG-11: 64 M 128 M 256 256 M 512 512 M 512 512 M
    VGG-13: 64 64 M 128 128 M 256 256 M 512 512 M 512 512 M
    VGG-16: 64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M
    VGG-19: 64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M

Every convolution is 3x3 + BN + ReLU. The first one is the task's stem; the trunk starts at the first
``M`` (VGG-11) or the second convolution. A max-pool is applied only while the spatial size is at least 2
(so 28x28 and 32x32 inputs both work: 28 -> 14 -> 7 -> 3 -> 1, and the last pool is skipped). Then global
average pooling, then optional hidden layers ``Linear + BatchNorm1d + ReLU [+ dropout]`` (``hidden``,
default one of 512 x width). ``feature_channels`` is the last hidden width (the last conv width with no
hidden layer); the classifier is the task's head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import Backbone, conv_bn, scale_width
from virtnet.errors import ConfigError
from virtnet.nn import BatchNorm1d, Linear, Route, Routed, RouteSequential

if TYPE_CHECKING:
    from virtnet.backbones.registry import BackboneConfig

_LAYOUTS = MappingProxyType(
    {
        11: "64 M 128 M 256 256 M 512 512 M 512 512 M",
        13: "64 64 M 128 128 M 256 256 M 512 512 M 512 512 M",
        16: "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
        19: "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
    }
)
VGG_CONFIGS: Mapping[int, tuple[int | str, ...]] = MappingProxyType(
    {depth: tuple(v if v == "M" else int(v) for v in layout.split()) for depth, layout in _LAYOUTS.items()}
)
"""Channels of each 3x3 convolution (before ``width``) and ``"M"`` for each 2x2 max-pool, by depth."""


class ConvBNReLU(RouteSequential):
    """3x3 convolution, batch norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(*conv_bn(in_channels, out_channels), nn.ReLU())


class LinearBNReLU(nn.Module, Routed):
    """Bias-free linear layer, BatchNorm1d, ReLU, optional dropout (a hidden FC layer)."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = Linear(in_features, out_features, bias=False)
        self.bn = BatchNorm1d(out_features)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        x = F.relu(self.bn(self.fc(x, route), route))  # (B, F)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        return x


class VGG(Backbone):
    """VGG-n trunk with batch norm (see the module docstring).

    Args:
        depth: 11, 13, 16 or 19.
        width: multiplier of every convolution's channels (``int(round(c * width))``, at least 1).
        input_size: the spatial side the trunk expects from stems.
        hidden: widths of the hidden FC layers after pooling (None: one of ``512 x width``; empty: none).
        dropout: dropout probability after each hidden layer.
    """

    default_depth = 11

    def __init__(
        self,
        depth: int = 11,
        width: float = 1.0,
        input_size: int = 32,
        hidden: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        problem = self.depth_problem(depth)
        if problem:
            raise ConfigError(f"depth: {problem}")
        if width <= 0:
            raise ConfigError(f"width: must be > 0, got {width}")
        hidden = [scale_width(512, width)] if hidden is None else [int(h) for h in hidden]
        if any(h < 1 for h in hidden):
            raise ConfigError(f"hidden: widths must be positive, got {hidden}")
        self.depth = depth
        self.hidden = tuple(hidden)
        self.input_size = input_size
        cfg = VGG_CONFIGS[depth]
        first = cfg[0]
        assert isinstance(first, int)
        self.in_channels = scale_width(first, width)
        layers: list[nn.Module] = []
        prev, size = self.in_channels, input_size
        for v in cfg[1:]:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                assert isinstance(v, int)
                c = scale_width(v, width)
                layers.append(ConvBNReLU(prev, c))
                prev = c
        self.blocks = RouteSequential(*layers)
        self.output_size = size
        fcs: list[nn.Module] = []
        for h in hidden:
            fcs.append(LinearBNReLU(prev, h, dropout))
            prev = h
        self.fc = RouteSequential(*fcs)
        self.feature_channels = prev

    @classmethod
    def depth_problem(cls, depth: int, layout: str = "cifar") -> str | None:
        if depth not in VGG_CONFIGS:
            return f"VGG depth must be one of 11, 13, 16, 19, got {depth}"
        return None

    @classmethod
    def from_config(cls, cfg: BackboneConfig, feature_size: int) -> VGG:
        return cls(
            depth=cfg.depth or cls.default_depth,
            width=cfg.width,
            input_size=feature_size,
            hidden=cfg.hidden,
            dropout=cfg.dropout,
        )

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        x = self.blocks(x, route)  # (B, C, h, w)
        x = x.mean(dim=(2, 3))  # (B, C)
        return self.fc(x, route)  # (B, feature_channels)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, hidden={list(self.hidden)}, input_size={self.input_size}"


__all__ = ["VGG", "VGG_CONFIGS", "ConvBNReLU", "LinearBNReLU"]
