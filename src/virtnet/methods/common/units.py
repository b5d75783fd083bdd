"""Unit orders: which units make up each level of each task's hierarchy (DVN, Sec. 3.2).

Units are numbered 0..k-1 here (the paper numbers them 1..k). A task's *order* is a permutation of the
units; level l (1-based) of that task is the first l units of its order, so level l's units are inside
level l+1's.

The paper's rule (eq. 3), for k tasks and k units, datasets of adjacent task ids being similar:
(i) unit i is the lowest level of task i; (ii) a task's hierarchy grows by coupling an adjacent unit
not yet coupled; (iii) of two adjacent units, the one with the lower id is coupled first. From the block
[lo, hi] the candidates are lo-1 and hi+1, and lo-1 wins whenever it exists, so the order of task j is
``j, j-1, ..., 0, j+1, ..., k-1``. For k = 3 (1-based) this gives [1,2,3], [2,1,3], [3,2,1] — eq. 3.

Generalisation to n tasks and k units (n != k, a choice of ours): task j starts at unit
``floor(j * k / n)`` and grows by the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from virtnet.errors import ConfigError


def rule_order(start: int, num_units: int) -> list[int]:
    """The eq. 3 order of the task whose lowest level is unit ``start``."""
    if not 0 <= start < num_units:
        raise ConfigError(f"start unit {start} is not one of {num_units} units")
    order = [start]
    lo = hi = start
    while len(order) < num_units:
        if lo - 1 >= 0:
            lo -= 1
            order.append(lo)
        else:
            hi += 1
            order.append(hi)
    return order


def rule_orders(num_tasks: int, num_units: int) -> list[list[int]]:
    """Orders of ``num_tasks`` tasks over ``num_units`` units by the eq. 3 rule (generalised)."""
    if num_tasks < 1 or num_units < 1:
        raise ConfigError(f"need at least one task and one unit, got {num_tasks} tasks and {num_units} units")
    return [rule_order((j * num_units) // num_tasks, num_units) for j in range(num_tasks)]


def check_order(order: Sequence[int], num_units: int, where: str) -> list[int]:
    """``order`` as a list, or a ConfigError when it is not a permutation of ``range(num_units)``."""
    order = [int(u) for u in order]
    if sorted(order) != list(range(num_units)):
        raise ConfigError(f"{where}: order {order} is not a permutation of the units 0..{num_units - 1}")
    return order


def level_units(order: Sequence[int], level: int) -> tuple[int, ...]:
    """Units of level ``level`` (1-based) of a task with ``order`` (sorted)."""
    if not 1 <= level <= len(order):
        raise ConfigError(f"level {level} does not exist: the hierarchy has levels 1..{len(order)}")
    return tuple(sorted(order[:level]))


def level_added(order: Sequence[int], unit: int) -> int:
    """S(i, j) of eq. 5: the level at which ``unit`` joins the hierarchy of a task with ``order``."""
    return list(order).index(unit) + 1
