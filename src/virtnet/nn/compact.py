"""Compact export: a physically smaller copy of a network for one route.

``compact(module, route)`` copies ``module`` and replaces every module that implements the routed-layer
protocol (:class:`virtnet.nn.RoutedLayer`) and gives a plain module for the route
(:meth:`~virtnet.nn.RoutedLayer.plain`) by that plain module: unit-partitioned layers by plain layers
holding only the channels of the route's selections (the weight blocks gathered once), switchable batch
norms by the route's private batch norm, adapter convolutions by their fusion, skipped blocks by what
computes them (the identity). Modules that give None, and plain torch modules, are kept and their children
cut in turn. The copy computes what ``module(x, route)`` computes, called as ``copy(x)``: the unused
units' channels are gone from every weight, so it runs faster in proportion (FLOPs only
become speed-up when weights really shrink).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from virtnet.nn.protocol import RoutedLayer
from virtnet.nn.units import Route


def _plain(module: nn.Module, route: Route | None) -> nn.Module | None:
    if isinstance(module, RoutedLayer):
        new = module.plain(route)
        if new is None and not module.active(route):
            raise ValueError(f"{type(module).__name__} is skipped by the route but gives no plain module")
        return new
    return None


def _replace(module: nn.Module, route: Route | None) -> None:
    for name, child in list(module.named_children()):
        new = _plain(child, route)
        if new is not None:
            setattr(module, name, new)
        else:
            _replace(child, route)


def compact(module: nn.Module, route: Route | None) -> nn.Module:
    """A standalone copy of ``module`` running ``route``'s selection only, called without a route.

    The copy shares no tensor with ``module`` and is returned in eval mode, with ordinary (not inference)
    tensors even when called under ``torch.inference_mode``.
    """
    with torch.inference_mode(False), torch.no_grad():
        top = _plain(module, route)
        if top is not None:
            return top.eval()
        new = copy.deepcopy(module)
        _replace(new, route)
        return new.eval()


__all__ = ["compact"]
