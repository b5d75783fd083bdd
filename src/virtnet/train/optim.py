"""Optimizers and learning-rate schedules.

Methods hand the loop parameter groups; a group may carry its own ``lr``, ``weight_decay`` or
``lr_scale`` (multiplied into the schedule). Frozen parameters must not be in any group: zeroing a
gradient does not freeze a weight, because momentum buffers and weight decay still move it (a known
pitfall of public implementations). Methods that mask parts of a tensor restore them in
``Method.after_step``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from virtnet.train.config import TrainConfig


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum by default), Adam or AdamW over ``groups``."""
    groups = [dict(g) for g in groups if len(list(g["params"])) > 0]
    for g in groups:
        g["params"] = list(g["params"])
        g.setdefault("lr_scale", 1.0)
        if "lr" in g:  # a group's own base learning rate, scheduled like the others
            g["base_lr"] = g.pop("lr")
    if not groups:
        raise ValueError("no trainable parameters in this phase")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The schedule's learning-rate multiplier at ``step`` (0-based) of a phase of ``total_steps``."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        frac = step / max(1, total_steps)
        return cfg.gamma ** sum(1 for m in cfg.milestones if frac >= m)
    # cosine from the end of warm-up to the end of the phase
    t = (step - warm) / max(1, total_steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def set_lr(opt: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Set every group's lr to ``base_lr * factor * group['lr_scale']`` (a group's own ``lr`` wins)."""
    for g in opt.param_groups:
        base = g.get("base_lr", base_lr)
        g["lr"] = base * factor * g.get("lr_scale", 1.0)
