"""Options of the ``branching`` method (fully-adaptive feature sharing, Lu et al., CVPR 2017)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from virtnet.backbones.vgg import VGG_CONFIGS
from virtnet.methods.base import MethodConfig


class BranchingConfig(MethodConfig):
    """``method:`` options of ``branching`` (docs/methods/branching.md has the table)."""

    # VGG-n of the thin model: 11, 13, 16 or 19
    depth: int = 16
    # thinness factor: conv widths min(omega, VGG width), FC widths 2 omega
    omega: int = Field(default=32, ge=1)
    # hidden FC layers (fc6, fc7, ...) of width 2 omega
    fc_layers: int = Field(default=2, ge=1)
    # branching factor of eq. 9 (> 0): larger creates more branches
    alpha: float = Field(default=1.0, gt=0)
    # L0 of eq. 9: the cost of one branch above every pooling layer (doubled per pooling layer below)
    unit_cost: float = Field(default=0.1, gt=0)
    # training steps of a round before its widening (the paper: 1000)
    round_steps: int = Field(default=1000, ge=1)
    # rounds at most (null: until no branching or the bottom; 0: the thin baseline)
    max_rounds: int | None = Field(default=None, ge=0)
    # weight of a mini-batch in the affinity estimate, per newer mini-batch (the paper: 0.99)
    decay: float = Field(default=0.99, gt=0, lt=1)
    # affinity of two tasks never labelled on one example: a number (0: none) or "independent" (marginals)
    unpaired_affinity: Literal["independent"] | float = 0.0
    # checkpoint of a wider virtnet VGG (joint, model vgg) to initialise from by SOMP (null: random)
    init_from: str | None = None
    # multilabel tasks whose outputs are separate tasks of the branching (binary attributes)
    attribute_tasks: list[str] = Field(default_factory=list)
    # one conv1_1 for every task (the tasks must share an input shape)
    shared_stem: bool = False
    # epochs of a separate "final" phase after the branching phase (0: none)
    final_epochs: int = Field(default=0, ge=0)

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: int) -> int:
        if v not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {v}")
        return v

    @field_validator("unpaired_affinity")
    @classmethod
    def _unpaired(cls, v: str | float) -> str | float:
        if not isinstance(v, str) and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"must be 'independent' or a number in [0, 1], got {v}")
        return v


__all__ = ["BranchingConfig"]
