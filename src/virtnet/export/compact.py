"""Compact export: a physically smaller copy of a network for one route.

``compact(module, route)`` copies ``module`` and replaces every unit-partitioned layer by a plain layer
holding only the channels of the route's units (the weight blocks gathered once), every switchable batch
norm by the route's private batch norm, and drops the partitions. The copy computes what
``module(x, route)`` computes, called as ``copy(x)``: the unused units' channels are gone from every weight,
so it runs faster in proportion (PITFALLS.md: FLOPs fall only to become speed-up when weights really
shrink).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from virtnet.nn.layers import BatchNorm1d, BatchNorm2d, Conv2d, Linear, _RoutedBatchNorm, _Sliced
from virtnet.nn.switchable import SwitchableBatchNorm
from virtnet.nn.units import Route


def _small_conv(layer: Conv2d, route: Route) -> Conv2d:
    w, b = layer.sliced_parameters(route)
    new = Conv2d(
        w.shape[1] * layer.groups,
        w.shape[0],
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=b is not None,
        padding_mode=layer.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _small_linear(layer: Linear, route: Route) -> Linear:
    w, b = layer.sliced_parameters(route)
    new = Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _small_bn(bn: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor | None) -> nn.Module:
    n = bn.num_features if idx is None else int(idx.numel())
    cls = BatchNorm2d if isinstance(bn, nn.BatchNorm2d) else BatchNorm1d
    new = cls(
        n, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats
    )
    sel = (lambda t: t.detach().clone()) if idx is None else (lambda t: t.detach()[idx].clone())
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(sel(bn.weight))
            new.bias.copy_(sel(bn.bias))
        if bn.running_mean is not None:
            new.running_mean.copy_(sel(bn.running_mean))
            new.running_var.copy_(sel(bn.running_var))
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _replace(module: nn.Module, route: Route) -> None:
    for name, child in list(module.named_children()):
        new: nn.Module | None = None
        if isinstance(child, SwitchableBatchNorm):
            new = _small_bn(child.norm(route.key), None)  # type: ignore[arg-type]
        elif isinstance(child, Conv2d) and isinstance(child, _Sliced):
            new = _small_conv(child, route)
        elif isinstance(child, Linear):
            new = _small_linear(child, route)
        elif isinstance(child, _RoutedBatchNorm):
            p = child.partition
            idx = None if (p is None or p.covers_all(route.units)) else p.indices(route.units or ())
            new = _small_bn(child, idx)  # type: ignore[arg-type]
        if new is not None:
            new.train(child.training)
            setattr(module, name, new)
        else:
            _replace(child, route)


@torch.no_grad()
def compact(module: nn.Module, route: Route) -> nn.Module:
    """A standalone copy of ``module`` running ``route``'s units only, called without a route.

    The copy shares no tensor with ``module`` and is returned in eval mode.
    """
    new = copy.deepcopy(module)
    _replace(new, route)
    return new.eval()
