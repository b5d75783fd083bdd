"""Route-aware layers: drop-in subclasses of ``nn.Conv2d``, ``nn.Linear`` and ``nn.BatchNorm*d``.

Each takes ``forward(x, route=None)``. With no route, or a route whose units cover every channel, or no
unit partition on the layer, it is exactly the torch layer. With a partial route it runs on the channels of
the route's units only: the weight blocks (output unit a, input unit b) with a and b active are gathered
with ``index_select`` (no Python loop over units) and the layer computes a physically smaller product.
In eval mode without autograd the gathered weights are cached per set of units and re-gathered only when
the weights change in place (their version counter moves), as after ``load_state_dict`` or an optimizer
step.

Because the classes subclass the torch layers, tools that walk a module tree for ``nn.Conv2d`` or
``nn.Linear`` (PackNet's masks, parallel adapters, FLOP counters) treat them as the torch layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.nn.units import Route, UnitPartition


class Routed:
    """Marker: the module's ``forward`` takes ``(x, route=None)``."""


def call(module: nn.Module, x: torch.Tensor, route: Route | None) -> torch.Tensor:
    """Call ``module`` with the route if it takes one, else with ``x`` alone."""
    if isinstance(module, Routed):
        return module(x, route)
    return module(x)


class RouteSequential(nn.Sequential, Routed):
    """``nn.Sequential`` that passes the route to the children that take one."""

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # type: ignore[override]
        for m in self:
            x = call(m, x, route)
        return x


class _Sliced(Routed):
    """Gathering of the weight blocks of the active units, with an eval-mode cache."""

    in_partition: UnitPartition | None
    out_partition: UnitPartition | None

    def _init_partitions(self) -> None:
        self.in_partition = None
        self.out_partition = None
        self._slice_cache: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor | None]] = {}

    def set_partitions(self, in_partition: UnitPartition | None, out_partition: UnitPartition | None) -> None:
        """Split this layer's input and output channels into units (None: that side is not split)."""
        self.in_partition = in_partition
        self.out_partition = out_partition
        self._slice_cache.clear()

    def _indices(self, route: Route | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if route is None or route.units is None:
            return None, None
        ii = oi = None
        if self.in_partition is not None and not self.in_partition.covers_all(route.units):
            ii = self.in_partition.indices(route.units)
        if self.out_partition is not None and not self.out_partition.covers_all(route.units):
            oi = self.out_partition.indices(route.units)
        return ii, oi

    def sliced_parameters(self, route: Route | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias of the route's units (the full tensors when nothing is sliced).

        Without autograd the result is cached per set of units and reused while the weights are the same
        tensors (same storage, same version counter); the cache hit is the fast path of inference.
        """
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        bias: torch.Tensor | None = self.bias  # type: ignore[attr-defined]
        if route is None or route.units is None:
            return weight, bias
        cacheable = not torch.is_grad_enabled()
        if cacheable:
            stamp = (
                weight.data_ptr(),
                weight._version,
                None if bias is None else (bias.data_ptr(), bias._version),
            )
            hit = self._slice_cache.get(route.units)
            if hit is not None and hit[0] == stamp:
                return hit[1], hit[2]
        ii, oi = self._indices(route)
        w = weight
        if oi is not None:
            oi = oi.to(weight.device)  # partitions cache CPU indices
            w = w.index_select(0, oi)
            if bias is not None:
                bias = bias.index_select(0, oi)
        if ii is not None:
            w = w.index_select(1, ii.to(weight.device))
        if (oi is not None or ii is not None) and _is_channels_last(weight):
            # index_select returns NCHW-contiguous blocks; a channels_last network (as the latency tools
            # run it) would then mix formats in every convolution and take a slower path
            w = w.contiguous(memory_format=torch.channels_last)
        if cacheable:
            self._slice_cache[route.units] = (stamp, w, bias)
        return w, bias

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # device/dtype moves invalidate the cache
        self._slice_cache.clear()
        return super()._apply(fn, recurse)  # type: ignore[misc]


def _is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels_last (and not also plain contiguous, as 1x1 kernels may be)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class Conv2d(_Sliced, nn.Conv2d):
    """``nn.Conv2d`` whose input and output channels may be split into units."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_partitions()

    def set_partitions(self, in_partition: UnitPartition | None, out_partition: UnitPartition | None) -> None:
        if self.groups != 1 and (in_partition is not None or out_partition is not None):
            raise ValueError("unit partitions are supported on convolutions with groups=1 only")
        super().set_partitions(in_partition, out_partition)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # type: ignore[override]
        w, b = self.sliced_parameters(route)
        return self._conv_forward(x, w, b)


class Linear(_Sliced, nn.Linear):
    """``nn.Linear`` whose input and output features may be split into units."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_partitions()

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # type: ignore[override]
        w, b = self.sliced_parameters(route)
        return F.linear(x, w, b)


class _RoutedBatchNorm(Routed):
    """Batch norm over the channels of the active units.

    The normalisation statistics and affine parameters of the selected channels are used; in training the
    running statistics of the selected channels alone are updated. Note that one batch norm shared by
    sub-networks of different widths sees different statistics per width: methods with several levels
    replace it with private normalisation per (task, level) (see the method's docs).
    """

    partition: UnitPartition | None

    def set_partition(self, partition: UnitPartition | None) -> None:
        self.partition = partition

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # type: ignore[override]
        p = self.partition
        if p is None or route is None or p.covers_all(route.units):
            return super().forward(x)  # type: ignore[misc]
        assert route.units is not None
        idx = p.indices(route.units).to(x.device)
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        training = bn.training or bn.running_mean is None
        rm = None if bn.running_mean is None else bn.running_mean.index_select(0, idx)
        rv = None if bn.running_var is None else bn.running_var.index_select(0, idx)
        w = None if bn.weight is None else bn.weight.index_select(0, idx)
        b = None if bn.bias is None else bn.bias.index_select(0, idx)
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        out = F.batch_norm(x, rm, rv, w, b, training, momentum, bn.eps)
        if bn.training and rm is not None and bn.running_mean is not None and bn.running_var is not None:
            with torch.no_grad():
                bn.running_mean.index_copy_(0, idx, rm)
                bn.running_var.index_copy_(0, idx, rv)
        return out


class BatchNorm2d(_RoutedBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose channels may be split into units."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partition = None


class BatchNorm1d(_RoutedBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose features may be split into units."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partition = None
