"""Budgeted inference: the level of a task that fits a budget, and one level per task under a shared budget.

A budget is a parameter count, a density (fraction of the task's largest level), a FLOPs bound (per
image, 2 per MAC) or a level index. :func:`choose_level` picks the largest level that fits.

Several tasks on one memory-limited device (DVN's motivating setting): :func:`choose_levels` picks one
level per task maximising the sum of the tasks' (validation) accuracies with the selection's total cost
within the budget. Memory is counted exactly: the distinct parameter elements the chosen levels use
together, so a trunk block that two tasks' levels share is counted once (:func:`selection_parameters`).
FLOPs add up over tasks (each task runs its own forward pass).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from virtnet.errors import BudgetError
from virtnet.nn.layers import _RoutedBatchNorm, _Sliced
from virtnet.nn.switchable import SwitchableBatchNorm
from virtnet.nn.units import Route

BudgetKind = Literal["level", "params", "density", "flops"]
MAX_COMBINATIONS = 200_000


@dataclass(frozen=True)
class Budget:
    """A budget: ``kind`` is level, params, density (0..1] or flops; ``value`` its bound."""

    kind: BudgetKind
    value: float

    def __str__(self) -> str:
        v = int(self.value) if self.kind in ("level", "params", "flops") else self.value
        return f"{self.kind}={v}"


def parse_budget(text: str) -> Budget:
    """``"params=120000"``, ``"density=0.3"`` or ``"density=30%"``, ``"flops=2e6"``, ``"level=2"``."""
    m = re.fullmatch(r"\s*(level|params|density|flops)\s*=\s*([0-9.eE+-]+)\s*(%?)\s*", text)
    if not m:
        raise BudgetError(f"budget '{text}': expected level=N, params=N, density=F (or P%) or flops=N")
    kind, num, pct = m.group(1), m.group(2), m.group(3)
    try:
        value = float(num)
    except ValueError:
        raise BudgetError(f"budget '{text}': '{num}' is not a number") from None
    if pct:
        if kind != "density":
            raise BudgetError(f"budget '{text}': only a density may be given in percent")
        value /= 100.0
    if value <= 0 or (kind == "density" and value > 1):
        raise BudgetError(
            f"budget '{text}': must be positive{' and at most 1 (100%)' if kind == 'density' else ''}"
        )
    return Budget(kind, value)  # type: ignore[arg-type]


@dataclass
class LevelCost:
    """Parameters (of the exported network), density and FLOPs of one level."""

    level: int
    name: str
    params: int
    density: float
    flops: int


def level_costs(method: Any, model: nn.Module, task: str, input_shape: Sequence[int]) -> list[LevelCost]:
    """Costs of every level of ``task`` from its exported networks (smallest level first)."""
    from virtnet.cost import count_flops, count_parameters

    out = []
    for lv in method.levels(model, task):
        net = method.export(model, task, lv.index)
        out.append(
            LevelCost(lv.index, lv.name, count_parameters(net), 0.0, count_flops(net, tuple(input_shape)))
        )
    top = out[-1].params
    for c in out:
        c.density = c.params / top
    return out


def _value(c: LevelCost, kind: str) -> float:
    return {"level": c.level, "params": c.params, "density": c.density, "flops": c.flops}[kind]


def choose_level(costs: Sequence[LevelCost], budget: Budget, task: str) -> LevelCost:
    """The largest level whose cost fits ``budget``; BudgetError naming the task when none does."""
    fitting = [c for c in costs if _value(c, budget.kind) <= budget.value + 1e-12]
    if not fitting:
        smallest = min(_value(c, budget.kind) for c in costs)
        shown = f"{smallest:.4g}" if budget.kind == "density" else f"{int(smallest):,}"
        raise BudgetError(
            f"task '{task}': no level fits the budget {budget} (the smallest level needs {shown})"
        )
    return max(fitting, key=lambda c: (_value(c, budget.kind), c.level))


# ---- several tasks under one budget -----------------------------------------------------------------
def usage_masks(network: nn.Module, route: Route | None) -> dict[int, torch.Tensor]:
    """For every parameter ``network(x, route)`` uses, a bool mask of the elements it uses (by ``id``)."""
    masks: dict[int, torch.Tensor] = {}

    def full(p: torch.Tensor) -> None:
        masks[id(p)] = torch.ones_like(p, dtype=torch.bool)

    def visit(m: nn.Module) -> None:
        if isinstance(m, SwitchableBatchNorm):
            if route is None or not route.key:
                raise BudgetError(
                    "a network with private normalisation needs a route to count its parameters"
                )
            for p in m.norm(route.key).parameters():
                full(p)
            return
        if isinstance(m, _Sliced):
            w: torch.Tensor = m.weight  # type: ignore[attr-defined]
            ii, oi = m._indices(route)
            out_m = torch.ones(w.shape[0], dtype=torch.bool)
            in_m = torch.ones(w.shape[1], dtype=torch.bool)
            if oi is not None:
                out_m = torch.zeros_like(out_m)
                out_m[oi] = True
            if ii is not None:
                in_m = torch.zeros_like(in_m)
                in_m[ii] = True
            masks[id(w)] = (
                (out_m[:, None] & in_m[None, :]).reshape(w.shape[:2] + (1,) * (w.dim() - 2)).expand_as(w)
            )
            b = getattr(m, "bias", None)
            if b is not None:
                masks[id(b)] = out_m.clone()
            return
        if isinstance(m, _RoutedBatchNorm) and m.partition is not None and route is not None:
            sel = torch.ones(m.num_features, dtype=torch.bool)  # type: ignore[attr-defined]
            if not m.partition.covers_all(route.units):
                sel = torch.zeros_like(sel)
                sel[m.partition.indices(route.units or ())] = True
            for p in m.parameters(recurse=False):
                masks[id(p)] = sel.clone()
            return
        for p in m.parameters(recurse=False):
            full(p)
        for c in m.children():
            visit(c)

    visit(network)
    return masks


def selection_parameters(method: Any, model: nn.Module, selection: Mapping[str, int]) -> int:
    """Distinct parameter elements used by the levels ``selection`` ({task: level}) together."""
    union: dict[int, torch.Tensor] = {}
    for task, level in selection.items():
        lv = method.level(model, task, level)
        net = model.task_network(task, level) if _takes_level(model) else model.task_network(task)
        for pid, m in usage_masks(net, lv.route).items():
            union[pid] = m if pid not in union else (union[pid] | m)
    return int(sum(int(m.sum()) for m in union.values()))


def _takes_level(model: nn.Module) -> bool:
    import inspect

    return "level" in inspect.signature(model.task_network).parameters


def choose_levels(
    method: Any,
    model: nn.Module,
    tasks: Sequence[str],
    budget: Budget,
    accuracy: Mapping[tuple[str, int], float],
    input_shapes: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """One level per task maximising the summed ``accuracy`` within ``budget`` (params or flops in total).

    Returns ``{"levels": {task: level}, "accuracy_sum": ..., "cost": ..., "budget": str}``. Ties in the
    accuracy sum go to the cheaper selection. BudgetError when even the smallest levels do not fit.
    """
    if budget.kind not in ("params", "flops"):
        raise BudgetError(f"a shared budget is a total of params or flops, not {budget.kind}")
    options = {t: [lv.index for lv in method.levels(model, t)] for t in tasks}
    n = 1
    for t in tasks:
        n *= len(options[t])
    if n > MAX_COMBINATIONS:
        raise BudgetError(f"{n:,} level combinations exceed the search limit of {MAX_COMBINATIONS:,}")
    flops: dict[tuple[str, int], int] = {}
    if budget.kind == "flops":
        for t in tasks:
            for c in level_costs(method, model, t, input_shapes[t]):
                flops[(t, c.level)] = c.flops
    best: tuple[float, float, dict[str, int]] | None = None
    for combo in itertools.product(*(options[t] for t in tasks)):
        sel = dict(zip(tasks, combo, strict=True))
        if budget.kind == "flops":
            cost = float(sum(flops[(t, lv)] for t, lv in sel.items()))
        else:
            cost = float(selection_parameters(method, model, sel))
        if cost > budget.value:
            continue
        acc = float(sum(accuracy[(t, lv)] for t, lv in sel.items()))
        if best is None or (acc, -cost) > (best[0], -best[1]):
            best = (acc, cost, sel)
    if best is None:
        smallest = {t: options[t][0] for t in tasks}
        need = (
            sum(flops[(t, lv)] for t, lv in smallest.items())
            if budget.kind == "flops"
            else selection_parameters(method, model, smallest)
        )
        raise BudgetError(
            f"tasks {list(tasks)}: no combination of levels fits the shared budget {budget} "
            f"(the smallest levels need {int(need):,})"
        )
    return {"levels": best[2], "accuracy_sum": best[0], "cost": int(best[1]), "budget": str(budget)}
