"""Switchable batch normalisation: private statistics and affine parameters per configuration.

One batch norm shared by sub-networks of different widths sees different statistics per width (the
activations of a unit depend on which other units feed it), so a network that runs several (task, level)
configurations keeps one batch norm per configuration (slimmable networks' "switchable BN"; DVN's private
normalisation). The configuration is named by ``route.key``; each private batch norm has exactly the
channels of its configuration's units.

With ``shared_affine`` the configurations share one set of affine parameters and keep only their running
statistics apart (per-task statistics, e.g. for Learning without Forgetting, where one trunk serves tasks
whose activations have different statistics but the same learned scale and shift).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.errors import TaskError
from virtnet.nn.layers import BatchNorm1d, BatchNorm2d, _RoutedBatchNorm, sliced_batch_norm
from virtnet.nn.protocol import RoutedLayer
from virtnet.nn.units import Route, UnitPartition


class SwitchableBatchNorm(nn.Module, RoutedLayer):
    """A batch norm per configuration key, each over that configuration's channels.

    Args:
        sizes: channels of each configuration, by key (e.g. ``{"mnist/1": 8, "mnist/2": 16}``).
        dims: 2 for ``BatchNorm2d`` (feature maps), 1 for ``BatchNorm1d`` (features).
        eps, momentum: as in torch's batch norm.
        shared_affine: one ``weight`` and ``bias`` for every configuration (all sizes must be equal); the
            private norms then hold running statistics only (``affine=False``).
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        dims: int = 2,
        eps: float = 1e-5,
        momentum: float = 0.1,
        shared_affine: bool = False,
    ) -> None:
        super().__init__()
        cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        if shared_affine and len(set(sizes.values())) > 1:
            raise ValueError(f"shared affine parameters need one channel count, got {dict(sizes)}")
        # ModuleDict keys may not contain '.', so keys are stored with '/' kept and '.' refused
        self.norms = nn.ModuleDict(
            {k: cls(n, eps=eps, momentum=momentum, affine=not shared_affine) for k, n in sizes.items()}
        )
        self.dims = dims
        self.shared_affine = shared_affine
        if shared_affine:
            n = next(iter(sizes.values())) if sizes else 0
            self.weight = nn.Parameter(torch.ones(n))
            self.bias = nn.Parameter(torch.zeros(n))

    @classmethod
    def replacing(
        cls,
        bn: nn.modules.batchnorm._BatchNorm,
        units: Mapping[str, tuple[int, ...] | None],
        partition: UnitPartition | None,
        shared_affine: bool = False,
    ) -> SwitchableBatchNorm:
        """A switchable batch norm for ``bn``'s channels, one per key of ``units`` (None: all channels).

        Every private norm starts from ``bn``'s statistics and affine parameters on its channels (with
        ``shared_affine``, the shared parameters are ``bn``'s).
        """
        sizes = {
            k: (bn.num_features if (u is None or partition is None) else partition.size(u))
            for k, u in units.items()
        }
        dims = 2 if isinstance(bn, nn.BatchNorm2d) else 1
        new = cls(sizes, dims, bn.eps, bn.momentum or 0.1, shared_affine)
        with torch.no_grad():
            if shared_affine and bn.affine:
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
            for k, u in units.items():
                idx = (
                    torch.arange(bn.num_features)
                    if (u is None or partition is None)
                    else partition.indices(u)
                )
                tgt = new.norms[k]
                if bn.affine and not shared_affine:
                    tgt.weight.copy_(bn.weight[idx])
                    tgt.bias.copy_(bn.bias[idx])
                if bn.running_mean is not None:
                    tgt.running_mean.copy_(bn.running_mean[idx])
                    tgt.running_var.copy_(bn.running_var[idx])
        return new

    def norm(self, key: str) -> nn.Module:
        """The private batch norm of configuration ``key``."""
        if key not in self.norms:
            raise TaskError(f"no normalisation for configuration '{key}' (have {list(self.norms)})")
        return self.norms[key]

    def _key(self, route: Route | None) -> str:
        if route is None or not route.key:
            raise TaskError("a switchable batch norm needs a route naming its (task, level) configuration")
        return route.key

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        bn = self.norm(self._key(route))
        if not self.shared_affine:
            return bn(x)
        # torch's batch norm with the key's statistics and the shared affine parameters
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        return F.batch_norm(
            x, bn.running_mean, bn.running_var, self.weight, self.bias, bn.training, momentum, bn.eps
        )

    # ---- the routed-layer protocol: the route's private batch norm alone -------------------------------
    @torch.no_grad()
    def plain(self, route: Route | None) -> nn.Module:
        """A copy of the route's private batch norm (with the shared affine parameters, if shared)."""
        bn = self.norm(self._key(route))
        if not self.shared_affine:
            return sliced_batch_norm(bn, None)  # type: ignore[arg-type]
        cls = BatchNorm2d if self.dims == 2 else BatchNorm1d
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum).to(self.weight)
        new.weight.copy_(self.weight)
        new.bias.copy_(self.bias)
        new.running_mean.copy_(bn.running_mean)  # type: ignore[union-attr]
        new.running_var.copy_(bn.running_var)  # type: ignore[union-attr]
        new.num_batches_tracked.copy_(bn.num_batches_tracked)  # type: ignore[union-attr]
        return new.train(bn.training)

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        if not self.shared_affine:
            return {}
        self.norm(self._key(route))
        return {n: torch.ones(p.shape, dtype=torch.bool) for n, p in self.named_parameters(recurse=False)}

    def delegates(self, route: Route | None) -> list[str]:
        key = self._key(route)
        self.norm(key)
        return [] if self.shared_affine else [f"norms.{key}"]


def make_switchable(
    module: nn.Module, units: Mapping[str, tuple[int, ...] | None], shared_affine: bool = False
) -> int:
    """Replace every unit-partitioned batch norm under ``module`` by a :class:`SwitchableBatchNorm` with
    one private norm per key of ``units`` (``shared_affine``: private running statistics only); returns
    how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _RoutedBatchNorm):
            new = SwitchableBatchNorm.replacing(child, units, child.partition, shared_affine)  # type: ignore[arg-type]
            setattr(module, name, new)
            count += 1
        else:
            count += make_switchable(child, units, shared_affine)
    return count
