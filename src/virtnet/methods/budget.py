"""Budgeted inference: the level of a task that fits a budget, and one level per task under a shared budget.

A budget is a parameter count, a density (fraction of the task's largest level), a FLOPs bound (per
image, 2 per MAC) or a level index. :func:`choose_level` picks the largest level that fits.

Several tasks on one memory-limited device (DVN's motivating setting): :func:`choose_levels` picks one
level per task maximising the sum of the tasks' (validation) accuracies with the selection's total cost
within the budget. Memory is counted exactly from the model protocol's ``parameter_usage(task, level)``
(:class:`virtnet.protocol.MultiTaskModel`): the distinct parameter elements the chosen levels read
together, so a trunk block that two tasks' levels share is counted once, PackNet's weights by ownership,
DVN's by units (:func:`selection_parameters`). FLOPs add up over tasks (each task runs its own forward
pass).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from virtnet.errors import BudgetError
from virtnet.protocol import union_usage, usage_count

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
    """Parameters, density and FLOPs of one level.

    ``params`` are the parameter elements the level reads in the model (``parameter_usage``: exact, e.g.
    PackNet's owned weights only); ``export_params`` those its exported network stores (more for a dense
    export with zeros, fewer for a fused one); FLOPs are the exported network's.
    """

    level: int
    name: str
    params: int
    density: float
    flops: int
    export_params: int = 0


def level_costs(method: Any, model: nn.Module, task: str, input_shape: Sequence[int]) -> list[LevelCost]:
    """Costs of every level of ``task`` (smallest level first): parameters from the model's
    ``parameter_usage``, FLOPs from the exported networks."""
    from virtnet.cost import count_flops, count_parameters

    out = []
    for lv in method.levels(model, task):
        net = method.export(model, task, lv.index)
        used = usage_count(model.parameter_usage(task, lv.index))  # type: ignore[operator]
        flops = count_flops(net, tuple(input_shape))
        out.append(LevelCost(lv.index, lv.name, used, 0.0, flops, count_parameters(net)))
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
def selection_usage(model: nn.Module, selection: Mapping[str, int]) -> dict[str, Any]:
    """The union of ``model.parameter_usage(task, level)`` over ``selection`` ({task: level}): a bool
    mask per parameter name of the elements the selected levels read together."""
    return union_usage([model.parameter_usage(t, lv) for t, lv in selection.items()])  # type: ignore[operator]


def selection_parameters(method: Any, model: nn.Module, selection: Mapping[str, int]) -> int:
    """Distinct parameter elements the levels ``selection`` ({task: level}) read together (exact: from
    the model's ``parameter_usage``, shared elements counted once). ``method`` is unused (kept for the
    callers' signature)."""
    return usage_count(selection_usage(model, selection))


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
