"""``method:`` options of ``den`` (Deep Elastic Networks)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from virtnet.methods.base import MethodConfig


class DENConfig(MethodConfig):
    """Options of Deep Elastic Networks; see docs/methods/den.md (Options) for each one's meaning."""

    levels: int = Field(default=3, ge=2, le=8)  # h: levels per block
    level_widths: list[float] | None = None  # inner-channel fraction per level (None: the paper's rule)
    rho: float = Field(default=0.1, ge=0)  # weight of S(z) = rho * (mean_i d_i(l_i))^2 (eq. 5)
    tau: float = Field(default=0.75, ge=0, le=1)  # initial distribution (eq. 8): weight of the full model
    stages: int = Field(default=3, ge=1, le=100)  # S: estimator + selector stages (Algorithm 1)
    estimator_epochs: int | None = Field(
        default=None, ge=1
    )  # epochs per estimator stage (None: train.epochs)
    selector_epochs: int | None = Field(default=None, ge=1)  # epochs per selector stage (None: train.epochs)
    train_full: bool = False  # estimator stages after the first also train the full structure (not the paper)
    task_bn: Literal["shared", "stats", "private"] = "shared"  # the trunk's batch norms per task
    lr_decay: float = Field(default=0.1, gt=0, le=1)  # learning-rate factor per stage (both parts)
    stage_schedule: Literal["constant", "step", "cosine"] | None = "constant"  # within a stage
    selector_lr: float = Field(default=1e-3, gt=0)  # Adam's learning rate for the selector
    samples: int = Field(default=4, ge=1, le=256)  # |Z|: structures sampled per instance (eq. 7)
    baseline: Literal["self_critical", "none"] = "self_critical"  # REINFORCE reward baseline
    epsilon: float = Field(default=0.2, ge=0, le=1)  # epsilon-greedy at the start of a selector stage
    epsilon_epochs: float = Field(default=1.0, ge=0)  # epochs over which epsilon decays to 0
    calibration_epochs: int = Field(default=1, ge=0, le=10)  # a final statistics phase (0: none)
    converge_tol: float | None = Field(default=None, ge=0)  # end early when the reward stops improving
    selector_width: int = Field(default=16, ge=1, le=1024)  # selector's first layer width
    selector_depth: int = Field(default=3, ge=1, le=8)  # selector's stride-2 conv layers
    selector_size: int | None = Field(default=None, ge=4)  # selector's input side (None: min(32, trunk's))
    budget_levels: list[float] = Field(default_factory=lambda: [0.5, 1.0])  # bounds, cheapest(0)..full(1)
    budget_kind: Literal["flops", "params"] = "flops"  # what the budget levels bound
    max_states: int = Field(default=20000, ge=16)  # state limit of the exact budgeted search

    @model_validator(mode="after")
    def _check(self) -> DENConfig:
        w = self.level_widths
        if w is not None:
            if len(w) != self.levels:
                raise ValueError(f"level_widths has {len(w)} entries for {self.levels} levels")
            grows = all(b > a for a, b in zip(w, w[1:], strict=False))
            if any(not 0 <= v <= 1 for v in w) or w[-1] != 1 or not grows:
                raise ValueError(f"level_widths must increase strictly within [0, 1] and end at 1, got {w}")
        b = self.budget_levels
        if not b or any(not 0 <= v <= 1 for v in b) or any(y <= x for x, y in zip(b, b[1:], strict=False)):
            raise ValueError(f"budget_levels must be increasing fractions in [0, 1], got {b}")
        return self
