"""Options of the ``branching`` method (fully-adaptive feature sharing, Lu et al., CVPR 2017)."""

from __future__ import annotations

from pydantic import Field, field_validator

from virtnet.backbones.vgg import VGG_CONFIGS
from virtnet.methods.base import MethodConfig


class BranchingConfig(MethodConfig):
    """``method:`` options of ``branching`` (docs/methods/branching.md has the table)."""

    depth: int = 16  # VGG-n of the thin model: 11, 13, 16 or 19
    omega: int = Field(
        default=32, ge=1
    )  # thinness factor: conv widths min(omega, VGG width), FC widths 2 omega
    fc_layers: int = Field(default=2, ge=1)  # hidden FC layers (fc6, fc7) of width 2 omega
    alpha: float = Field(default=1.0, gt=0)  # branching factor (eq. 9): larger creates more branches
    unit_cost: float = Field(default=0.1, gt=0)  # L0 of eq. 9: cost of one branch above every pooling layer
    round_steps: int = Field(
        default=1000, ge=1
    )  # training steps of a round before its widening (paper: 1000)
    max_rounds: int | None = Field(
        default=None, ge=0
    )  # None: until no branching or the bottom; 0: thin baseline
    decay: float = Field(
        default=0.99, gt=0, lt=1
    )  # weight decay of older mini-batches in the affinity estimate
    init_from: str | None = None  # checkpoint of a wider VGG (joint, model vgg) for SOMP initialisation
    attribute_tasks: list[str] = Field(default_factory=list)  # multilabel tasks whose outputs are tasks
    shared_stem: bool = False  # one conv1 for every task (tasks must share an input shape)
    final_epochs: int = Field(default=0, ge=0)  # a separate "final" phase of this many epochs after branching

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: int) -> int:
        if v not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {v}")
        return v


__all__ = ["BranchingConfig"]
