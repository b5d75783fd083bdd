"""The routed-layer protocol: what a route-aware layer tells generic code about one route.

A route-aware module derives from :class:`RoutedLayer` and answers, for a :class:`~virtnet.nn.Route`:

* :meth:`RoutedLayer.plain` — the plain torch module that computes what ``layer(x, route)`` computes,
  called as ``plain(x)``, holding only what the route reads (a physically sliced ``Conv2d`` / ``Linear``,
  the route's private batch norm, a fused adapter convolution) and sharing no tensor with the layer; or
  ``None``: keep the module and cut its children instead (containers);
* :meth:`RoutedLayer.usage` — a bool mask per parameter the route reads of the parameters the layer
  decides about itself: its own (``recurse=False``) and those of descendants it does not delegate, by
  name relative to the layer; a parameter it does not name is not read;
* :meth:`RoutedLayer.delegates` — the descendants (dotted paths) the route runs and that answer for
  themselves (default: every child); the others are not run unless :meth:`usage` names their parameters;
* :meth:`RoutedLayer.active` — False when the route skips the module altogether (an empty block).

Generic code walks a module tree through this protocol only: :func:`usage`, :func:`usage_by_param` and
:func:`virtnet.nn.compact` treat a module that does not implement it as a plain torch module (every
parameter used, every child run, kept as it is by export).

Slots: a layer side or a block may carry a *slot* name (``in_slot`` / ``out_slot`` of the sliced conv and
linear layers, ``slot`` of batch norms and :class:`RoutedBlock`); a route's ``layers`` entry for that slot
overrides its default ``units`` there. :func:`name_slots` sets slot names from module paths.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from virtnet.nn.units import Route


class Routed:
    """Marker: the module's ``forward`` takes ``(x, route=None)``."""


def call(module: nn.Module, x: torch.Tensor, route: Route | None) -> torch.Tensor:
    """Call ``module`` with the route if it takes one, else with ``x`` alone."""
    if isinstance(module, Routed):
        return module(x, route)
    return module(x)


class RoutedLayer(Routed, abc.ABC):
    """A route-aware module that says what a route makes of it (see the module docstring).

    Subclasses implement :meth:`plain` and :meth:`usage`; :meth:`delegates` and :meth:`active` have
    defaults (every child runs; the module is never skipped).
    """

    @abc.abstractmethod
    def plain(self, route: Route | None) -> nn.Module | None:
        """A plain torch module computing ``self(x, route)`` as ``plain(x)``, sharing no tensor with
        ``self`` (in this module's training mode, on its device), or None to keep this module and cut its
        children."""

    @abc.abstractmethod
    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        """Bool masks (each of its parameter's shape) of the elements ``self(x, route)`` reads, for the
        parameters this module decides about (its own, and those of descendants not in
        :meth:`delegates`), by name relative to it. A parameter not named is not read."""

    def delegates(self, route: Route | None) -> list[str]:
        """The descendants (dotted paths relative to this module) that the route runs and that answer for
        themselves. Default: every child."""
        assert isinstance(self, nn.Module)
        return [name for name, _ in self.named_children()]

    def active(self, route: Route | None) -> bool:
        """False when ``route`` skips this module: none of its parameters is read, and :meth:`plain`
        gives what replaces it."""
        return True


def full_usage(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every element of ``module``'s own parameters (``recurse=False``) used."""
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in module.named_parameters(recurse=False)}


class RoutedBlock(nn.Module, RoutedLayer):
    """Base for a block (e.g. a residual block) that a route may skip or run at a width of its own.

    The block's slot (``self.slot``, set by :func:`name_slots`, None until then) names it in a route's
    ``layers``: an empty selection skips the block (:meth:`active` False; :meth:`plain` gives
    :meth:`skipped_module`, the identity by default: a block with a non-identity shortcut must override
    it or never be skipped). The slot's selection is that of the block's inner channels, the sides listed
    in ``INNER_CHANNELS`` (``"conv1.out"``, ``"bn1"``, ``"conv2.in"``: the output side of ``conv1``, the
    batch norm ``bn1``, the input side of ``conv2``), which :func:`name_slots` gives the block's slot.
    A block's forward should start with ``if route is not None and route.skips(self.slot): return x``.
    """

    INNER_CHANNELS: tuple[str, ...] = ()
    slot: str | None = None

    def plain(self, route: Route | None) -> nn.Module | None:
        if not self.active(route):
            return self.skipped_module()
        return None

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        return full_usage(self)

    def active(self, route: Route | None) -> bool:
        return route is None or not route.skips(self.slot)

    def skipped_module(self) -> nn.Module:
        """What computes the block when a route skips it (the identity)."""
        return nn.Identity()


def _set_side(module: nn.Module, side: str, slot: str, where: str) -> None:
    """Give one side of a layer (``"out"`` / ``"in"`` of a sliced layer, or ``""`` for the whole layer)
    the slot name ``slot``."""
    attr = {"in": "in_slot", "out": "out_slot", "": "slot"}[side]
    if not hasattr(module, attr):
        raise ValueError(f"{where}: {type(module).__name__} has no '{attr}' to name")
    setattr(module, attr, slot)


def name_slots(
    module: nn.Module, blocks: Mapping[str, Sequence[str]] | None = None, prefix: str = ""
) -> list[str]:
    """Name the slots of ``module``'s blocks after their paths; returns the slot names, in module order.

    A block is a submodule whose class declares ``INNER_CHANNELS`` (see :class:`RoutedBlock`), or one
    named in ``blocks`` (path relative to ``module`` → its inner sides, same spelling). Its slot is
    ``prefix + path``; the block itself gets ``slot`` when it has that attribute, and each listed side
    ``"child.out"``, ``"child.in"`` or ``"child"`` (a batch norm) gets the slot name, so a route's
    ``layers`` entry for the slot selects the block's inner channels. Stable as long as the module tree
    is: name the slots once, on the same root, wherever routes are made.

    Raises:
        ValueError: a listed side that does not exist or cannot carry a slot.
    """
    found: list[str] = []
    explicit = dict(blocks or {})
    for path, m in module.named_modules():
        inner = explicit.pop(path, None) if path in explicit else getattr(type(m), "INNER_CHANNELS", None)
        if not inner:
            continue
        slot = prefix + path
        m.slot = slot  # the block's own slot (a RoutedBlock reads it to skip itself)
        for spec in inner:
            child, _, side = spec.partition(".")
            where = f"block '{slot}', side '{spec}'"
            try:
                target = m.get_submodule(child)
            except AttributeError:
                raise ValueError(f"{where}: no submodule '{child}'") from None
            _set_side(target, side, slot, where)
        found.append(slot)
    if explicit:
        raise ValueError(f"name_slots: no submodule {sorted(explicit)} in {type(module).__name__}")
    return found


# ---- walking a module tree ---------------------------------------------------------------------------
def _walk(
    module: nn.Module,
    route: Route | None,
    prefix: str,
    out: dict[int, tuple[str, nn.Parameter, torch.Tensor]],
) -> None:
    def add(name: str, p: nn.Parameter | None, mask: torch.Tensor) -> None:
        if p is None:
            return
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(
                f"usage mask of '{name}' has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}"
            )
        mask = mask.to(device="cpu", dtype=torch.bool)
        hit = out.get(id(p))
        if hit is None:
            out[id(p)] = (name, p, mask.clone())
        else:
            out[id(p)] = (hit[0], p, hit[2] | mask)

    if isinstance(module, RoutedLayer):
        if not module.active(route):
            return
        params = dict(module.named_parameters())
        for name, mask in module.usage(route).items():
            if name not in params:
                raise ValueError(f"{type(module).__name__}.usage names '{name}', not one of its parameters")
            add(prefix + name, params[name], mask)
        for path in module.delegates(route):
            _walk(module.get_submodule(path), route, f"{prefix}{path}.", out)
        return
    for name, p in module.named_parameters(recurse=False):
        add(prefix + name, p, torch.ones_like(p, dtype=torch.bool))
    for name, child in module.named_children():
        _walk(child, route, f"{prefix}{name}.", out)


def usage_by_param(module: nn.Module, route: Route | None) -> dict[int, tuple[nn.Parameter, torch.Tensor]]:
    """What ``module(x, route)`` reads, by parameter identity.

    ``usage_by_param(module, route) -> {id(parameter): (parameter, mask)}`` where ``mask`` is a CPU bool
    tensor of the parameter's shape, True on the elements read. Only parameters with at least one element
    read appear. A parameter reachable under several paths (a shared module, tied weights) appears once,
    with the union of its masks. This is what a model's ``parameter_usage(task, level)`` calls on its
    ``task_network(task, level)`` with ``route(task, level)``, mapping the ids back to its own parameter
    names (``{id(p): n for n, p in self.named_parameters()}``).
    """
    walked: dict[int, tuple[str, nn.Parameter, torch.Tensor]] = {}
    _walk(module, route, "", walked)
    return {pid: (p, m) for pid, (_, p, m) in walked.items() if bool(m.any())}


def usage(module: nn.Module, route: Route | None) -> dict[str, torch.Tensor]:
    """What ``module(x, route)`` reads: ``{dotted parameter name relative to module: bool mask}``.

    The name of a parameter reachable under several paths is the first met in module order (as
    ``named_parameters()`` would give it); its mask is the union. Only parameters with at least one element
    read appear; ``virtnet.protocol.usage_count`` counts the elements.
    """
    walked: dict[int, tuple[str, nn.Parameter, torch.Tensor]] = {}
    _walk(module, route, "", walked)
    return {name: m for name, _, m in walked.values() if bool(m.any())}


def usage_count(masks: Iterable[torch.Tensor] | Mapping[Any, Any]) -> int:
    """Elements selected by the masks of :func:`usage` (a mapping of masks) or :func:`usage_by_param`."""
    values = masks.values() if isinstance(masks, Mapping) else masks
    total = 0
    for v in values:
        m = v[1] if isinstance(v, tuple) else v
        total += int(m.sum())
    return total


__all__ = [
    "Routed",
    "RoutedBlock",
    "RoutedLayer",
    "call",
    "full_usage",
    "name_slots",
    "usage",
    "usage_by_param",
    "usage_count",
]
