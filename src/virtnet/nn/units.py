"""Routes and unit partitions.

A *unit* (Deep Virtual Networks, Kim et al. 2019, Sec. 3.2) is a disjoint group of feature maps in every
layer, collected across all layers. A layer whose channels are split into units carries a
:class:`UnitPartition`; a forward pass carries a :class:`Route` saying which task runs and which units are
active. Layers without a partition ignore the route's units and run dense.

The route is an argument of every ``forward``, never a global or a module attribute set beforehand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from virtnet.errors import ConfigError


@dataclass(frozen=True)
class Route:
    """Which virtual sub-network a forward pass runs.

    Attributes:
        task: the task's name.
        units: sorted ids of the active units, or None for every channel (the dense network).
        key: name of the (task, level) configuration, e.g. ``"mnist/2"``; selects private normalisation
            layers and heads where a method has them. Empty when the method has none.
    """

    task: str
    units: tuple[int, ...] | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if self.units is not None:
            units = tuple(sorted(int(u) for u in self.units))
            if len(set(units)) != len(units):
                raise ConfigError(f"route for task '{self.task}': repeated unit in {self.units}")
            object.__setattr__(self, "units", units)


class UnitPartition:
    """The split of one layer's ``channels`` into consecutive, disjoint units.

    Unit ``i`` owns channels ``offsets[i] : offsets[i] + sizes[i]``. The channels of a set of units are
    gathered in increasing unit id, the same order in every layer, so a sliced layer and an exported
    layer agree.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        sizes = tuple(int(s) for s in sizes)
        if not sizes or any(s <= 0 for s in sizes):
            raise ConfigError(f"unit sizes must be positive, got {sizes}")
        self.sizes = sizes
        self.offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        self.channels = sum(sizes)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def split(cls, channels: int, num_units: int, ratios: Sequence[float] | None = None) -> UnitPartition:
        """Split ``channels`` into ``num_units`` units, equal or in the given ``ratios``.

        With ratios, unit sizes are rounded so that they sum to ``channels`` (largest remainders first).
        Raises ConfigError when a unit would get no channel.
        """
        if num_units < 1:
            raise ConfigError(f"number of units must be >= 1, got {num_units}")
        if num_units > channels:
            raise ConfigError(f"{num_units} units do not fit a layer of {channels} channels")
        if ratios is None:
            ratios = [1.0] * num_units
        if len(ratios) != num_units or any(r <= 0 for r in ratios):
            raise ConfigError(f"unit ratios {list(ratios)} must be {num_units} positive numbers")
        total = float(sum(ratios))
        exact = [channels * r / total for r in ratios]
        sizes = [int(e) for e in exact]
        rest = channels - sum(sizes)
        for i in sorted(range(num_units), key=lambda i: exact[i] - sizes[i], reverse=True)[:rest]:
            sizes[i] += 1
        if any(s == 0 for s in sizes):
            raise ConfigError(f"unit ratios {list(ratios)} leave a unit of a {channels}-channel layer empty")
        return cls(sizes)

    @property
    def num_units(self) -> int:
        return len(self.sizes)

    def size(self, units: Sequence[int] | None) -> int:
        """Number of channels of ``units`` (all channels for None)."""
        if units is None:
            return self.channels
        return sum(self.sizes[u] for u in units)

    def indices(self, units: Sequence[int]) -> torch.Tensor:
        """LongTensor of the channels of ``units`` in increasing unit id (cached)."""
        key = tuple(sorted(units))
        idx = self._cache.get(key)
        if idx is None:
            for u in key:
                if not 0 <= u < self.num_units:
                    raise ConfigError(f"unit {u} does not exist: the layer has {self.num_units} units")
            # a normal tensor even when first asked for under inference_mode (evaluation): an inference
            # tensor cached here would break every later training step that indexes with it
            with torch.inference_mode(False):
                idx = torch.cat([torch.arange(self.offsets[u], self.offsets[u] + self.sizes[u]) for u in key])
            self._cache[key] = idx
        return idx

    def covers_all(self, units: Sequence[int] | None) -> bool:
        """True when ``units`` select every channel."""
        return units is None or len(set(units)) == self.num_units

    def __repr__(self) -> str:
        return f"UnitPartition(sizes={list(self.sizes)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitPartition) and other.sizes == self.sizes

    def __hash__(self) -> int:
        return hash(self.sizes)
