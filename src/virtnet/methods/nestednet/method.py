"""NestedNet (Kim, Park, Kwak; CVPR 2018) with channel pruning, as Deep Virtual Networks' baseline:
nested levels of one unit order (0, 1, ..., k-1) shared by every task, learned jointly; task i uses level
i (``nested: multi_task``) or every task has all levels (``nested: single_task``)."""

from __future__ import annotations

from typing import Literal

from virtnet.backbones.base import TaskSpec
from virtnet.errors import ConfigError
from virtnet.methods.base import register
from virtnet.methods.common.unit_method import LevelsConfig, UnitMethod


class NestedNetConfig(LevelsConfig):
    """``method:`` options of ``nestednet``: ``multi_task`` gives task i level i of one shared order;
    ``single_task`` gives every task all levels of that one order."""

    nested: Literal["multi_task", "single_task"] = "multi_task"


@register
class NestedNet(UnitMethod):
    """NestedNet with channel pruning: nested levels of one order shared by all tasks."""

    name = "nestednet"
    Config = NestedNetConfig

    def orders(self, specs: list[TaskSpec], k: int) -> list[list[int]]:
        return [list(range(k)) for _ in specs]

    def offered(self, specs: list[TaskSpec], k: int) -> dict[str, list[int]]:
        if self.config.nested == "single_task":
            return {s.name: list(range(1, k + 1)) for s in specs}
        if k < len(specs):
            raise ConfigError(
                f"method.num_units: NestedNet gives task i level i: {len(specs)} tasks need at "
                f"least {len(specs)} units, not {k}"
            )
        # task i of n uses level round((i + 1) * k / n): with k = n, task i uses level i
        n = len(specs)
        return {s.name: [max(1, round((i + 1) * k / n))] for i, s in enumerate(specs)}
