"""Route-aware layers: drop-in subclasses of ``nn.Conv2d``, ``nn.Linear`` and ``nn.BatchNorm*d``.

Each takes ``forward(x, route=None)``. With no route, or a route whose units cover every channel, or no
unit partition on the layer, it is exactly the torch layer. With a partial route it runs on the channels of
the route's units only: the weight blocks (output unit a, input unit b) with a and b active are gathered
with ``index_select`` (no Python loop over units) and the layer computes a physically smaller product.
In eval mode without autograd the gathered weights are cached per set of units and re-gathered only when
the weights change in place (their version counter moves), as after ``load_state_dict`` or an optimizer
step.

Per-layer selections: each side of a sliced layer (``in_slot``, ``out_slot``) and each batch norm
(``slot``) may carry a slot name; the route's selection for that slot (:meth:`Route.select`) replaces its
default ``units`` there. Every layer implements :class:`virtnet.nn.RoutedLayer`: ``plain(route)`` is the
physically sliced torch layer, ``usage(route)`` the masks of the weight elements the route reads.

Because the classes subclass the torch layers, tools that walk a module tree for ``nn.Conv2d`` or
``nn.Linear`` (PackNet's masks, parallel adapters, FLOP counters) treat them as the torch layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from virtnet.nn.protocol import Routed, RoutedLayer, call
from virtnet.nn.units import Route, Selection, UnitPartition


class RouteSequential(nn.Sequential, Routed):
    """``nn.Sequential`` that passes the route to the children that take one."""

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # type: ignore[override]
        for m in self:
            x = call(m, x, route)
        return x


class _Sliced(RoutedLayer):
    """Gathering of the weight blocks of the active units, with an eval-mode cache."""

    in_partition: UnitPartition | None
    out_partition: UnitPartition | None
    in_slot: str | None
    out_slot: str | None

    def _init_partitions(self) -> None:
        self.in_partition = None
        self.out_partition = None
        self.in_slot = None
        self.out_slot = None
        self._slice_cache: dict[
            tuple[Selection, Selection], tuple[Any, torch.Tensor, torch.Tensor | None]
        ] = {}

    def set_partitions(self, in_partition: UnitPartition | None, out_partition: UnitPartition | None) -> None:
        """Split this layer's input and output channels into units (None: that side is not split)."""
        self.in_partition = in_partition
        self.out_partition = out_partition
        self._slice_cache.clear()

    def selections(self, route: Route | None) -> tuple[Selection, Selection]:
        """The route's unit selection of the input and of the output side (None: every channel)."""
        if route is None:
            return None, None
        return route.select(self.in_slot), route.select(self.out_slot)

    def _indices(self, route: Route | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        sel_in, sel_out = self.selections(route)
        ii = oi = None
        if self.in_partition is not None and not self.in_partition.covers_all(sel_in):
            ii = self.in_partition.indices(sel_in or ())
        if self.out_partition is not None and not self.out_partition.covers_all(sel_out):
            oi = self.out_partition.indices(sel_out or ())
        return ii, oi

    def sliced_parameters(self, route: Route | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias of the route's units (the full tensors when nothing is sliced).

        Without autograd the result is cached per selection and reused while the weights are the same
        tensors (same storage, same version counter); the cache hit is the fast path of inference.
        Inference tensors (made under ``torch.inference_mode``) have no version counter and are not cached.
        """
        weight: torch.Tensor = self.weight  # type: ignore[attr-defined]
        bias: torch.Tensor | None = self.bias  # type: ignore[attr-defined]
        if route is None:
            return weight, bias
        sels = self.selections(route)
        if sels == (None, None):
            return weight, bias
        cacheable = (
            not torch.is_grad_enabled()
            and not weight.is_inference()
            and (bias is None or not bias.is_inference())
            and not _is_fake(weight)
        )
        if cacheable:
            stamp = (
                weight.data_ptr(),
                weight._version,
                None if bias is None else (bias.data_ptr(), bias._version),
            )
            # one selection for both sides (a route without per-slot entries here): keyed by it
            ckey: Any = sels[0] if sels[0] == sels[1] else ("slots", *sels)
            hit = self._slice_cache.get(ckey)
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
            self._slice_cache[ckey] = (stamp, w, bias)
        return w, bias

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        """The weight blocks (active output unit, active input unit) and the active outputs' bias."""
        w: torch.Tensor = self.weight  # type: ignore[attr-defined]
        sel_in, sel_out = self.selections(route)
        out_m = torch.ones(w.shape[0], dtype=torch.bool)
        in_m = torch.ones(w.shape[1], dtype=torch.bool)
        if self.out_partition is not None:
            out_m = self.out_partition.mask(sel_out)
        if self.in_partition is not None:
            in_m = self.in_partition.mask(sel_in)
        shape = tuple(w.shape[:2]) + (1,) * (w.dim() - 2)
        masks = {"weight": (out_m[:, None] & in_m[None, :]).reshape(shape).expand(w.shape).clone()}
        if getattr(self, "bias", None) is not None:
            masks["bias"] = out_m.clone()
        return masks

    def delegates(self, route: Route | None) -> list[str]:
        return []

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # device/dtype moves invalidate the cache
        self._slice_cache.clear()
        return super()._apply(fn, recurse)  # type: ignore[misc]


def _is_fake(t: torch.Tensor) -> bool:
    """A tensor without real data (traced by torch.export / torch.compile, or on the meta device)."""
    return t.device.type == "meta" or is_fake(t)


def _copy_into(new: nn.Module, w: torch.Tensor, b: torch.Tensor | None, like: nn.Module) -> nn.Module:
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)  # type: ignore[operator]
        if b is not None:
            new.bias.copy_(b)  # type: ignore[operator]
    return new.train(like.training)


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

    @torch.no_grad()
    def plain(self, route: Route | None) -> nn.Module:
        """A ``Conv2d`` (this class, no partitions) holding the route's weight blocks only."""
        w, b = self.sliced_parameters(route)
        new = Conv2d(
            w.shape[1] * self.groups,
            w.shape[0],
            self.kernel_size,  # type: ignore[arg-type]
            stride=self.stride,  # type: ignore[arg-type]
            padding=self.padding,  # type: ignore[arg-type]
            dilation=self.dilation,  # type: ignore[arg-type]
            groups=self.groups,
            bias=b is not None,
            padding_mode=self.padding_mode,
        )
        return _copy_into(new, w, b, self)


class Linear(_Sliced, nn.Linear):
    """``nn.Linear`` whose input and output features may be split into units."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_partitions()

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # type: ignore[override]
        w, b = self.sliced_parameters(route)
        return F.linear(x, w, b)

    @torch.no_grad()
    def plain(self, route: Route | None) -> nn.Module:
        """A ``Linear`` (this class, no partitions) holding the route's weight blocks only."""
        w, b = self.sliced_parameters(route)
        return _copy_into(Linear(w.shape[1], w.shape[0], bias=b is not None), w, b, self)


class _RoutedBatchNorm(RoutedLayer):
    """Batch norm over the channels of the active units.

    The normalisation statistics and affine parameters of the selected channels are used; in training the
    running statistics of the selected channels alone are updated. Note that one batch norm shared by
    sub-networks of different widths sees different statistics per width: methods with several levels
    replace it with private normalisation per (task, level) (see the method's docs).
    """

    partition: UnitPartition | None
    slot: str | None = None

    def set_partition(self, partition: UnitPartition | None) -> None:
        self.partition = partition

    def selection(self, route: Route | None) -> Selection:
        """The route's unit selection of this batch norm's channels (None: every channel)."""
        return None if route is None else route.select(self.slot)

    def channel_indices(self, route: Route | None) -> torch.Tensor | None:
        """The channels the route normalises (None: every channel)."""
        p, sel = self.partition, self.selection(route)
        if p is None or p.covers_all(sel):
            return None
        return p.indices(sel or ())

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        """The affine parameters of the route's channels."""
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        sel = torch.ones(bn.num_features, dtype=torch.bool)
        if self.partition is not None:
            sel = self.partition.mask(self.selection(route))
        return {n: sel.clone() for n, _ in bn.named_parameters(recurse=False)}

    def delegates(self, route: Route | None) -> list[str]:
        return []

    @torch.no_grad()
    def plain(self, route: Route | None) -> nn.Module:
        """A batch norm (this module's class, no partition) over the route's channels, with their
        statistics and affine parameters."""
        return sliced_batch_norm(self, self.channel_indices(route))  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # type: ignore[override]
        p = self.partition
        if p is None or route is None or p.covers_all(self.selection(route)):
            return super().forward(x)  # type: ignore[misc]
        idx = p.indices(self.selection(route) or ()).to(x.device)
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


@torch.no_grad()
def sliced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor | None) -> nn.Module:
    """A new :class:`BatchNorm2d` / :class:`BatchNorm1d` holding ``bn``'s channels ``idx`` (None: all):
    their affine parameters, running statistics and batch count, copied; in ``bn``'s training mode."""
    n = bn.num_features if idx is None else int(idx.numel())
    cls = BatchNorm2d if isinstance(bn, nn.BatchNorm2d) else BatchNorm1d
    new = cls(
        n, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats
    )
    ref = bn.weight if bn.weight is not None else bn.running_mean
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)

    def sel(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone() if idx is None else t.detach()[idx.to(t.device)].clone()

    if bn.affine:
        new.weight.copy_(sel(bn.weight))
        new.bias.copy_(sel(bn.bias))
    if bn.running_mean is not None and new.running_mean is not None:
        new.running_mean.copy_(sel(bn.running_mean))
        new.running_var.copy_(sel(bn.running_var))  # type: ignore[union-attr]
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)  # type: ignore[union-attr]
    return new.train(bn.training)
