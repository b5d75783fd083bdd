"""Routes and unit partitions.

A *unit* (Deep Virtual Networks, Kim et al. 2019, Sec. 3.2) is a disjoint group of feature maps in every
layer, collected across all layers. A layer whose channels are split into units carries a
:class:`UnitPartition`; a forward pass carries a :class:`Route` saying which task runs and which units are
active. Layers without a partition ignore the route's units and run dense.

The route is an argument of every ``forward``, never a global or a module attribute set beforehand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from virtnet.errors import ConfigError

Selection = tuple[int, ...] | None
"""A unit selection: sorted unit ids, ``None`` for every channel, ``()`` for none (a skipped block)."""


def _selection(units: Sequence[int] | None, what: str) -> Selection:
    if units is None:
        return None
    sel = tuple(sorted(int(u) for u in units))
    if len(set(sel)) != len(sel):
        raise ConfigError(f"{what}: repeated unit in {tuple(units)}")
    return sel


@dataclass(frozen=True)
class Route:
    """Which virtual sub-network a forward pass runs.

    Attributes:
        task: the task's name.
        units: sorted ids of the active units, or None for every channel (the dense network): the default
            selection of every routed layer and block.
        key: name of the (task, level) configuration, e.g. ``"mnist/2"``; selects private normalisation
            layers and heads where a method has them. Empty when the method has none.
        layers: per-slot selections overriding ``units``: ``((slot, selection), ...)`` sorted by slot name.
            A *slot* is a stable name a routed layer side or a block carries (``in_slot`` / ``out_slot`` of
            :class:`~virtnet.nn.Conv2d` and :class:`~virtnet.nn.Linear`, ``slot`` of a batch norm or a
            :class:`~virtnet.nn.RoutedBlock`), e.g. set from module paths by :func:`virtnet.nn.name_slots`.
            For a residual block the slot's selection picks its inner channels; an empty selection ``()``
            skips the block (Deep Elastic Networks' per-block levels). A mapping is accepted and stored
            sorted.
        instance: an optional per-instance selection, e.g. a ``(B, n_blocks)`` long tensor of levels for
            a method that picks a structure per input and groups a batch by it. Layers ignore it; it is the
            only tensor of a route and takes no part in equality or hashing.

    A route is immutable, hashable (its non-tensor part) and a pytree (leaves: ``instance``; context: the
    rest), so ``torch.export.export(model, (x, route))`` and ``torch.compile`` accept it as an argument.
    """

    task: str
    units: tuple[int, ...] | None = None
    key: str = ""
    layers: tuple[tuple[str, tuple[int, ...] | None], ...] = ()
    instance: torch.Tensor | None = field(default=None, compare=False, hash=False)
    _by_slot: dict[str, Selection] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", _selection(self.units, f"route for task '{self.task}'"))
        items = self.layers.items() if isinstance(self.layers, Mapping) else self.layers
        layers = []
        for entry in items:
            if len(entry) != 2 or not isinstance(entry[0], str):
                raise ConfigError(
                    f"route for task '{self.task}': layers entry {entry!r} is not (slot, units)"
                )
            layers.append(
                (entry[0], _selection(entry[1], f"route for task '{self.task}', slot '{entry[0]}'"))
            )
        layers.sort(key=lambda e: e[0])
        names = [n for n, _ in layers]
        if len(set(names)) != len(names):
            raise ConfigError(f"route for task '{self.task}': a slot is named twice in {names}")
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "_by_slot", dict(layers))
        if self.instance is not None and not isinstance(self.instance, torch.Tensor):
            raise ConfigError(f"route for task '{self.task}': instance must be a tensor or None")

    def select(self, slot: str | None) -> Selection:
        """The selection of ``slot``: its own entry in ``layers``, else ``units`` (None: ``units``)."""
        if slot is None or not self._by_slot:
            return self.units
        return self._by_slot.get(slot, self.units)

    def skips(self, slot: str | None) -> bool:
        """True when ``slot`` is selected empty (a block this route skips)."""
        sel = self.select(slot)
        return sel is not None and len(sel) == 0

    def replace(self, **changes: Any) -> Route:
        """A copy with some fields changed (e.g. ``route.replace(layers={"blocks.2": ()})``)."""
        return dataclasses.replace(self, **changes)

    def static(self) -> Route:
        """This route without its per-instance selection."""
        return self if self.instance is None else dataclasses.replace(self, instance=None)


def _route_flatten(r: Route) -> tuple[list[Any], tuple[Any, ...]]:
    return [r.instance], (r.task, r.units, r.key, r.layers)


def _route_flatten_with_keys(r: Route) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
    return [(pytree.GetAttrKey("instance"), r.instance)], (r.task, r.units, r.key, r.layers)


def _route_unflatten(children: Iterable[Any], context: tuple[Any, ...]) -> Route:
    (instance,) = list(children)
    task, units, key, layers = context
    return Route(task, units, key, layers, instance)


def _route_context_to_json(context: tuple[Any, ...]) -> Any:
    task, units, key, layers = context
    return [
        task,
        None if units is None else list(units),
        key,
        [[n, None if u is None else list(u)] for n, u in layers],
    ]


def _route_context_from_json(d: Any) -> tuple[Any, ...]:
    task, units, key, layers = d
    return (
        task,
        None if units is None else tuple(units),
        key,
        tuple((n, None if u is None else tuple(u)) for n, u in layers),
    )


pytree.register_pytree_node(
    Route,
    _route_flatten,
    _route_unflatten,
    serialized_type_name="virtnet.nn.Route",
    to_dumpable_context=_route_context_to_json,
    from_dumpable_context=_route_context_from_json,
    flatten_with_keys_fn=_route_flatten_with_keys,
)


def _traced(t: torch.Tensor) -> bool:
    """A tensor without real data: made under a fake mode (torch.export, torch.compile) or on meta."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


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
                parts = [torch.arange(self.offsets[u], self.offsets[u] + self.sizes[u]) for u in key]
                idx = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
            if not _traced(idx):  # made while torch.export / torch.compile trace: valid in that trace only
                self._cache[key] = idx
        return idx

    def covers_all(self, units: Sequence[int] | None) -> bool:
        """True when ``units`` select every channel."""
        return units is None or len(set(units)) == self.num_units

    def mask(self, units: Sequence[int] | None) -> torch.Tensor:
        """Bool tensor ``(channels,)``: True on the channels of ``units`` (every channel for None)."""
        m = torch.ones(self.channels, dtype=torch.bool)
        if not self.covers_all(units):
            assert units is not None
            m = torch.zeros_like(m)
            m[self.indices(units)] = True
        return m

    def __repr__(self) -> str:
        return f"UnitPartition(sizes={list(self.sizes)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitPartition) and other.sizes == self.sizes

    def __hash__(self) -> int:
        return hash(self.sizes)
