"""The physical network of Deep Virtual Networks (Kim, Ahn, Torr, Oh; CVPR 2019).

One backbone whose every layer's channels (except the task-specific input layers' inputs) are split into
k disjoint *units*. Task j's *deep virtual network* is a hierarchy of levels: level l runs the first l
units of task j's order, with all weight blocks between them (the inter-connections), a private batch
norm per (task, level) and a classifier head per (task, level). Levels are routes through the same
tensors: no weight is copied, the layers gather the blocks of the active units.

State that must survive a checkpoint lives in buffers: the orders (``orders``, one row per task) and
the number of units in use (``active_units``: k for joint learning; it grows by one per task in
sequential learning, Sec. 3.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from virtnet.backbones.base import MultiTaskNet, TaskNet
from virtnet.errors import BudgetError, CheckpointError
from virtnet.methods.common.units import check_order, level_units
from virtnet.nn import Linear, Route, call, make_switchable
from virtnet.nn.units import UnitPartition
from virtnet.protocol import check_structure


def level_key(task: str, level: int) -> str:
    """Name of a (task, level) configuration: selects its batch norms and head."""
    return f"{task}/{level}"


class VirtualNet(MultiTaskNet):
    """A multi-task network hosting one hierarchy of levels per task.

    Args:
        base: a freshly built :class:`MultiTaskNet` (one stem per task); its trunk and stems are taken over.
        num_units: k, the number of units every layer is split into.
        orders: one permutation of ``range(k)`` per task, in the order of ``base``'s tasks.
        offered: the levels each task offers (1-based), e.g. all of ``1..k`` (DVN) or just ``[j]``
            (NestedNet's task j).
        ratios: relative unit sizes (None: equal units).
    """

    def __init__(
        self,
        base: MultiTaskNet,
        num_units: int,
        orders: list[list[int]],
        offered: dict[str, list[int]],
        ratios: list[float] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if base.shared_stem:
            raise ValueError("deep virtual networks need one stem per task")
        self.trunk = base.trunk
        self.stems = base.stems
        self.specs = dict(base.specs)
        self.shared_stem = False
        names = list(self.specs)
        self.num_units = num_units
        _, feat = base.set_units(num_units, ratios)
        self.feature_partition: UnitPartition = feat
        orders = [check_order(o, num_units, f"method.orders[{i}]") for i, o in enumerate(orders)]
        self.register_buffer("orders", torch.tensor(orders, dtype=torch.long))  # (tasks, k)
        self.register_buffer("active_units", torch.tensor(num_units, dtype=torch.long))
        self.offered = {t: sorted(offered[t]) for t in names}
        keys = {
            level_key(t, lv): level_units(orders[i], lv)
            for i, t in enumerate(names)
            for lv in self.offered[t]
        }
        make_switchable(self.trunk, keys)
        for t in names:
            make_switchable(self.stems[t], {k: u for k, u in keys.items() if k.rsplit("/", 1)[0] == t})
        self.heads = nn.ModuleDict(
            {k: Linear(feat.size(u), self.specs[k.rsplit("/", 1)[0]].num_outputs) for k, u in keys.items()}
        )

    # ---- levels ------------------------------------------------------------------------------------
    def order(self, task: str) -> list[int]:
        """Task ``task``'s unit order."""
        self.spec(task)
        return [int(u) for u in self.orders[list(self.specs).index(task)]]

    def levels(self, task: str) -> list[int]:
        """The protocol's levels: :meth:`levels_of`."""
        return self.levels_of(task)

    def levels_of(self, task: str) -> list[int]:
        """The levels task ``task`` offers now (those whose units are all in use)."""
        active = int(self.active_units)
        order = self.order(task)
        return [lv for lv in self.offered[task] if max(order[:lv]) < active]

    def route(self, task: str, level: int | None = None) -> Route:
        """The route of (task, level); None: the task's largest level now."""
        levels = self.levels_of(task)
        if level is None:
            if not levels:
                raise BudgetError(f"task '{task}' has no level with its units in use yet")
            level = levels[-1]
        if level not in self.offered[task]:
            raise BudgetError(f"task '{task}' offers levels {self.offered[task]}, not {level}")
        return Route(task, level_units(self.order(task), level), level_key(task, level))

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task: str, route: Route | None = None) -> torch.Tensor:
        """Logits ``(B, outputs)`` of task ``task`` at the level of ``route`` (default: its largest)."""
        if route is None:
            route = self.route(task)
        f = self.trunk(call(self.stem(task), x, route), route)  # (B, |units| channels)
        return self.heads[route.key](f)

    def task_network(self, task: str, level: int | None = None) -> TaskNet:  # type: ignore[override]
        """(task, level)'s network, sharing this model's modules (call it with the level's route)."""
        return TaskNet(self.stem(task), self.trunk, self.heads[self.route(task, level).key])

    # ---- structure ---------------------------------------------------------------------------------
    def structure(self) -> dict[str, Any]:
        """Units, orders, offered levels and the units in use (sequential learning adds one per task)."""
        return {
            "num_units": self.num_units,
            "unit_sizes": list(self.feature_partition.sizes),
            "orders": {t: self.order(t) for t in self.specs},
            "offered": {t: list(v) for t, v in self.offered.items()},
            "active_units": int(self.active_units),
        }

    def apply_structure(self, structure: Mapping[str, Any]) -> None:
        """Set the units in use; the rest must be what this model was built with."""
        saved = dict(structure)
        active = saved.pop("active_units", None)
        if isinstance(active, bool) or not isinstance(active, int) or not 1 <= active <= self.num_units:
            raise CheckpointError(
                f"structure.active_units: expected an integer in 1..{self.num_units}, got {active!r}"
            )
        own = self.structure()
        own.pop("active_units")
        check_structure(saved, own)
        self.active_units.fill_(active)
