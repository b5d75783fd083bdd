"""Switchable batch normalisation: private statistics and affine parameters per configuration.

One batch norm shared by sub-networks of different widths sees different statistics per width (the
activations of a unit depend on which other units feed it), so a network that runs several (task, level)
configurations keeps one batch norm per configuration (slimmable networks' "switchable BN"; DVN's private
normalisation). The configuration is named by ``route.key``; each private batch norm has exactly the
channels of its configuration's units.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from virtnet.errors import TaskError
from virtnet.nn.layers import _RoutedBatchNorm, sliced_batch_norm
from virtnet.nn.protocol import RoutedLayer
from virtnet.nn.units import Route, UnitPartition


class SwitchableBatchNorm(nn.Module, RoutedLayer):
    """A batch norm per configuration key, each over that configuration's channels.

    Args:
        sizes: channels of each configuration, by key (e.g. ``{"mnist/1": 8, "mnist/2": 16}``).
        dims: 2 for ``BatchNorm2d`` (feature maps), 1 for ``BatchNorm1d`` (features).
        eps, momentum: as in torch's batch norm.
    """

    def __init__(
        self, sizes: Mapping[str, int], dims: int = 2, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__()
        cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        # ModuleDict keys may not contain '.', so keys are stored with '/' kept and '.' refused
        self.norms = nn.ModuleDict({k: cls(n, eps=eps, momentum=momentum) for k, n in sizes.items()})
        self.dims = dims

    @classmethod
    def replacing(
        cls,
        bn: nn.modules.batchnorm._BatchNorm,
        units: Mapping[str, tuple[int, ...] | None],
        partition: UnitPartition | None,
    ) -> SwitchableBatchNorm:
        """A switchable batch norm for ``bn``'s channels, one per key of ``units`` (None: all channels).

        Every private norm starts from ``bn``'s statistics and affine parameters on its channels.
        """
        sizes = {
            k: (bn.num_features if (u is None or partition is None) else partition.size(u))
            for k, u in units.items()
        }
        new = cls(sizes, 2 if isinstance(bn, nn.BatchNorm2d) else 1, bn.eps, bn.momentum or 0.1)
        with torch.no_grad():
            for k, u in units.items():
                idx = (
                    torch.arange(bn.num_features)
                    if (u is None or partition is None)
                    else partition.indices(u)
                )
                tgt = new.norms[k]
                if bn.affine:
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
        return self.norm(self._key(route))(x)

    # ---- the routed-layer protocol: the route's private batch norm alone -------------------------------
    def plain(self, route: Route | None) -> nn.Module:
        """A copy of the route's private batch norm."""
        return sliced_batch_norm(self.norm(self._key(route)), None)  # type: ignore[arg-type]

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        return {}

    def delegates(self, route: Route | None) -> list[str]:
        key = self._key(route)
        self.norm(key)
        return [f"norms.{key}"]


def make_switchable(module: nn.Module, units: Mapping[str, tuple[int, ...] | None]) -> int:
    """Replace every unit-partitioned batch norm under ``module`` by a :class:`SwitchableBatchNorm` with
    one private norm per key of ``units``; returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _RoutedBatchNorm):
            setattr(module, name, SwitchableBatchNorm.replacing(child, units, child.partition))  # type: ignore[arg-type]
            count += 1
        else:
            count += make_switchable(child, units)
    return count
