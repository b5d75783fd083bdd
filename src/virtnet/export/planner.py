"""The shared-budget planner: one level per running task, maximising the summed validation accuracy within
one total memory budget, with the parameters that several tasks' levels share counted once.

Memory is counted exactly through the model protocol: a (task, level) reads the elements that
``model.parameter_usage(task, level)`` marks; a selection of levels needs the **union** of their masks
(:func:`virtnet.protocol.union_usage`), so a trunk block two tasks share is counted once. The masks are
flattened once into one bit set per (task, level) (``numpy.packbits`` over every parameter, in the
model's ``named_parameters`` order), so a union is a ``bitwise_or`` and a count a popcount.

Budgets (:func:`parse_total_budget`): ``params=N`` (distinct parameter elements), ``bytes=N`` (their bytes
at each parameter's element size, plus the buffers each level's export holds when they are given —
batch-norm running statistics, counted per task), ``flops=N`` (FLOPs per image summed over the tasks:
each task runs its own forward). Suffixes ``k``, ``M``, ``G`` (powers of 1000) and ``KiB``, ``MiB``,
``GiB`` are accepted.

The search is exact: a depth-first search over the tasks' levels with two prunings that lose nothing —
a partial selection whose union already exceeds the budget is abandoned (adding a task never shrinks a
union), and so is one whose accuracy so far plus the best accuracy each remaining task could add cannot
reach the best found. Ties in the summed accuracy go to the cheaper selection, then to the larger levels
(the lexicographically larger tuple of levels in task order). ``tests/test_planner.py`` checks it against
brute force.

When no accuracy is known (a model with random weights, or no validation data), the objective is the
selection's summed *level fraction* (level index over the task's largest): bigger levels are preferred,
and the plan says so (``objective``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch import nn

from virtnet.errors import BudgetError, ConfigError

TotalKind = Literal["params", "bytes", "flops"]
_SUFFIX = {
    "": 1,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "kB": 1e3,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
}


@dataclass(frozen=True)
class TotalBudget:
    """A total budget over the running tasks: ``kind`` params, bytes or flops, ``value`` its bound."""

    kind: TotalKind
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={int(self.value)}"


def parse_total_budget(text: str | TotalBudget) -> TotalBudget:
    """``"params=150000"``, ``"bytes=2MiB"``, ``"bytes=6e5"``, ``"flops=5M"`` (BudgetError otherwise)."""
    if isinstance(text, TotalBudget):
        return text
    m = re.fullmatch(r"\s*(params|bytes|flops)\s*=\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(3) not in _SUFFIX:
        raise BudgetError(
            f"budget '{text}': expected params=N, bytes=N or flops=N (N may end in k, M, G, KiB, MiB, GiB)"
        )
    try:
        value = float(m.group(2)) * _SUFFIX[m.group(3)]
    except ValueError:
        raise BudgetError(f"budget '{text}': '{m.group(2)}' is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget '{text}': must be a positive number")
    return TotalBudget(m.group(1), value)  # type: ignore[arg-type]


@dataclass
class Plan:
    """One level per task under a total budget (what :meth:`Planner.plan` returns).

    Attributes:
        levels: ``{task: level}``.
        accuracy: the objective's value per task (validation accuracy, or the level fraction).
        objective: ``"accuracy"`` or ``"level fraction"`` (no accuracy known).
        score: the summed objective.
        params: distinct parameter elements the levels read together (shared ones once).
        bytes: their bytes, plus the given buffer bytes of each level.
        flops: FLOPs per image summed over the tasks (None when not known).
        budget: the budget as text; ``searched``: search nodes visited.
    """

    levels: dict[str, int]
    accuracy: dict[str, float]
    objective: str
    score: float
    params: int
    bytes: int
    flops: int | None
    budget: str
    searched: int = 0
    measured: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "levels": dict(self.levels),
            "objective": self.objective,
            "accuracy": dict(self.accuracy),
            "score": self.score,
            "params": self.params,
            "bytes": self.bytes,
            "flops": self.flops,
            "searched": self.searched,
            "measured": dict(self.measured),
        }


class _Bits:
    """A union of parameter elements as packed bits, grouped by element size (bytes per element)."""

    def __init__(self, groups: dict[int, np.ndarray]) -> None:
        self.groups = groups

    def __or__(self, other: _Bits) -> _Bits:
        return _Bits({k: np.bitwise_or(v, other.groups[k]) for k, v in self.groups.items()})

    def count(self) -> int:
        return int(sum(int(np.bitwise_count(v).sum()) for v in self.groups.values()))

    def nbytes(self) -> int:
        return int(sum(k * int(np.bitwise_count(v).sum()) for k, v in self.groups.items()))


class Planner:
    """Exact level choice for a set of running tasks under a total budget (see the module docstring).

    Args:
        model: the packed model (a :class:`virtnet.protocol.MultiTaskModel`); only its protocol is used.
        accuracy: ``{(task, level): accuracy}`` (validation); None: the level fraction is maximised.
        buffer_bytes: ``{(task, level): bytes}`` of what each level's export holds besides parameters
            (added to ``bytes`` per task); None: none.
        flops: ``{(task, level): FLOPs per image}``; needed for flops budgets.
    """

    def __init__(
        self,
        model: nn.Module,
        accuracy: Mapping[tuple[str, int], float] | None = None,
        buffer_bytes: Mapping[tuple[str, int], int] | None = None,
        flops: Mapping[tuple[str, int], int] | None = None,
    ) -> None:
        self.model = model
        self.accuracy = dict(accuracy) if accuracy is not None else None
        self.buffer_bytes = dict(buffer_bytes or {})
        self.flops = dict(flops) if flops is not None else None
        params = list(model.named_parameters())
        self._layout: dict[str, tuple[int, int, int]] = {}  # name -> (element size, offset, numel)
        sizes: dict[int, int] = {}
        for name, p in params:
            es = p.element_size()
            self._layout[name] = (es, sizes.get(es, 0), p.numel())
            sizes[es] = sizes.get(es, 0) + p.numel()
        self._sizes = sizes
        self._bits: dict[tuple[str, int], _Bits] = {}
        self._levels: dict[str, list[int]] = {}

    # ---- what the model offers ----------------------------------------------------------------------
    def levels(self, task: str) -> list[int]:
        if task not in self._levels:
            self.model.check_task(task)  # type: ignore[operator]
            self._levels[task] = list(self.model.levels(task))  # type: ignore[operator]
        return self._levels[task]

    def bits(self, task: str, level: int) -> _Bits:
        """The (task, level)'s parameter usage as packed bits (computed once)."""
        key = (task, level)
        if key not in self._bits:
            usage = self.model.parameter_usage(task, level)  # type: ignore[operator]
            flat = {es: np.zeros(n, dtype=bool) for es, n in self._sizes.items()}
            for name, mask in usage.items():
                if name not in self._layout:
                    raise ConfigError(f"task '{task}' level {level}: parameter_usage names unknown '{name}'")
                es, off, n = self._layout[name]
                flat[es][off : off + n] = mask.detach().cpu().reshape(-1).numpy()
            self._bits[key] = _Bits({es: np.packbits(v) for es, v in flat.items()})
        return self._bits[key]

    def score(self, task: str, level: int) -> float:
        if self.accuracy is None:
            return level / max(self.levels(task))
        if (task, level) not in self.accuracy:
            raise ConfigError(f"task '{task}' level {level}: no accuracy given to the planner")
        return float(self.accuracy[(task, level)])

    def _flops(self, task: str, level: int) -> int:
        if self.flops is None or (task, level) not in self.flops:
            raise ConfigError(f"task '{task}' level {level}: a flops budget needs the level's FLOPs")
        return int(self.flops[(task, level)])

    def cost(self, selection: Mapping[str, int], kind: TotalKind = "params") -> int:
        """The cost of ``{task: level}`` in ``kind`` (params and bytes: shared elements once)."""
        if kind == "flops":
            return sum(self._flops(t, lv) for t, lv in selection.items())
        union: _Bits | None = None
        for t, lv in selection.items():
            b = self.bits(t, lv)
            union = b if union is None else union | b
        if union is None:
            return 0
        if kind == "params":
            return union.count()
        return union.nbytes() + sum(int(self.buffer_bytes.get((t, lv), 0)) for t, lv in selection.items())

    # ---- the search ---------------------------------------------------------------------------------
    def plan(self, budget: str | TotalBudget, tasks: Sequence[str]) -> Plan:
        """The best selection of one level per task in ``tasks`` within ``budget``.

        BudgetError (one line) when even the smallest levels do not fit together; TaskError for a task
        the model does not have.
        """
        b = parse_total_budget(budget)
        tasks = list(dict.fromkeys(tasks))
        if not tasks:
            raise ConfigError("plan: no tasks to run")
        options = {t: self.levels(t) for t in tasks}
        scores = {(t, lv): self.score(t, lv) for t in tasks for lv in options[t]}
        kind = b.kind
        extra = {
            (t, lv): (int(self.buffer_bytes.get((t, lv), 0)) if kind == "bytes" else 0)
            for t in tasks
            for lv in options[t]
        }
        # best score each suffix of the task list can still add (for the bound)
        best_rest = [0.0] * (len(tasks) + 1)
        for i in range(len(tasks) - 1, -1, -1):
            t = tasks[i]
            best_rest[i] = best_rest[i + 1] + max(scores[(t, lv)] for lv in options[t])
        best: tuple[float, float, tuple[int, ...]] | None = None
        searched = 0

        def measure(union: _Bits | None, fl: int, ex: int) -> int:
            if kind == "flops":
                return fl
            assert union is not None
            return union.count() if kind == "params" else union.nbytes() + ex

        def visit(i: int, union: _Bits | None, fl: int, ex: int, acc: float, chosen: tuple[int, ...]) -> None:
            nonlocal best, searched
            searched += 1
            if i == len(tasks):
                cost = float(measure(union, fl, ex))
                key = (acc, -cost, chosen)
                if best is None or key > (best[0], -best[1], best[2]):
                    best = (acc, cost, chosen)
                return
            if best is not None and acc + best_rest[i] < best[0] - 1e-9:
                return
            t = tasks[i]
            for lv in sorted(options[t], reverse=True):
                u = union
                if kind != "flops":
                    bits = self.bits(t, lv)
                    u = bits if union is None else union | bits
                nfl = fl + (self._flops(t, lv) if kind == "flops" else 0)
                nex = ex + extra[(t, lv)]
                if measure(u, nfl, nex) > b.value:
                    continue  # a union only grows as tasks are added
                visit(i + 1, u, nfl, nex, acc + scores[(t, lv)], chosen + (lv,))

        visit(0, None, 0, 0, 0.0, ())
        if best is None:
            smallest = {t: min(options[t]) for t in tasks}
            need = self.cost(smallest, kind)
            raise BudgetError(
                f"tasks {tasks}: no combination of levels fits the budget {b} "
                f"(the smallest levels need {kind}={need:,})"
            )
        sel = dict(zip(tasks, best[2], strict=True))
        return Plan(
            levels=sel,
            accuracy={t: scores[(t, lv)] for t, lv in sel.items()},
            objective="accuracy" if self.accuracy is not None else "level fraction",
            score=best[0],
            params=self.cost(sel, "params"),
            bytes=self.cost(sel, "bytes"),
            flops=(self.cost(sel, "flops") if self.flops is not None else None),
            budget=str(b),
            searched=searched,
        )


def plan_levels(
    model: nn.Module,
    tasks: Sequence[str],
    budget: str | TotalBudget,
    accuracy: Mapping[tuple[str, int], float] | None = None,
    buffer_bytes: Mapping[tuple[str, int], int] | None = None,
    flops: Mapping[tuple[str, int], int] | None = None,
) -> Plan:
    """One-shot :meth:`Planner.plan` (build a :class:`Planner` to re-plan cheaply)."""
    return Planner(model, accuracy, buffer_bytes, flops).plan(budget, tasks)


__all__ = ["Plan", "Planner", "TotalBudget", "parse_total_budget", "plan_levels"]
