"""PackNet's options (the ``method:`` section of a run config with ``name: packnet``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from virtnet.errors import ConfigError
from virtnet.methods.base import MethodConfig


class PackNetConfig(MethodConfig):
    """Options of :class:`~virtnet.methods.packnet.method.PackNet` (unknown keys are errors).

    Example::

        method:
          name: packnet
          prune_ratios: [0.5, 0.75]   # task 1 pruned by 50 %, task 2 by 75 %, task 3 (the last) unpruned
          retrain_epochs: 1
          retrain_lr: 0.001
    """

    # fraction of the current task's weights pruned (per layer) after training it, one per task in order.
    # N - 1 values leave the last task unpruned (the paper's "0.50, 0.75, 0.75" for 4 tasks); N values prune
    # every task. None: 0.5 for the first task, 0.75 for the others, the last unpruned.
    prune_ratios: list[float] | None = None
    # epochs of re-training after each pruning step (0: prune without re-training)
    retrain_epochs: int = Field(default=1, ge=0)
    # learning rate of re-training (the paper: 1e-4, constant, after training at 1e-3)
    retrain_lr: float = Field(default=1e-3, gt=0)
    # schedule of re-training (the paper: constant)
    retrain_schedule: Literal["constant", "step", "cosine"] = "constant"
    # incremental pruning: reach each task's ratio in this many prune + re-train rounds (1: one-shot)
    prune_steps: int = Field(default=1, ge=1)
    # batch-norm parameters and running statistics per task. None: per task when the network starts from
    # scratch, frozen after task 1 (the paper's choice) with init_from (a pre-trained first task). Frozen
    # BN from scratch diverges: docs/methods/packnet.md, "Frozen BatchNorm: why it diverged"
    task_specific_bn: bool | None = None
    # biases (and any other non-prunable shared parameter) per task (default: trained with task 1, frozen)
    task_specific_bias: bool = False
    # one stem for every task (needs one input shape); None: shared when every task has the same shape
    shared_stem: bool | None = None
    # checkpoint whose trunk (and matching stems/heads) start the run, like the sequential baselines
    init_from: str | None = None

    @field_validator("prune_ratios")
    @classmethod
    def _ratios(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            for r in v:
                if not 0.0 <= r < 1.0:
                    raise ValueError(f"each pruning ratio must lie in [0, 1), got {r}")
        return v

    def bn_per_task(self) -> bool:
        """Whether batch norm is kept per task: ``task_specific_bn``, or when it is None, True from scratch
        and False (frozen after the first task, the paper's setting) with ``init_from``."""
        if self.task_specific_bn is not None:
            return self.task_specific_bn
        return self.init_from is None

    def ratios_for(self, num_tasks: int) -> list[float]:
        """One pruning ratio per task (0 = not pruned) for ``num_tasks`` tasks.

        Raises:
            ConfigError: ``prune_ratios`` has neither N - 1 nor N values.
        """
        if self.prune_ratios is None:
            return ([0.5] + [0.75] * max(0, num_tasks - 2) + [0.0])[:num_tasks] if num_tasks > 1 else [0.0]
        n = len(self.prune_ratios)
        if n == num_tasks:
            return list(self.prune_ratios)
        if n == num_tasks - 1:
            return [*self.prune_ratios, 0.0]
        raise ConfigError(
            f"method.prune_ratios: {n} ratios for {num_tasks} tasks (give {num_tasks - 1}, the last task "
            f"unpruned, or {num_tasks})"
        )


__all__ = ["PackNetConfig"]
