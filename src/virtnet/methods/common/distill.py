"""Distillation shared by the methods that keep old tasks' responses (LwF, sequential DVN): Hinton's
temperature-scaled loss, input conversion between tasks of different shapes, the frozen teacher copy."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import TaskSpec


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton's modified cross-entropy: ``-mean_b sum_c softmax(t/T)_c * log_softmax(s/T)_c``.

    Args:
        student: ``(B, C)`` logits being trained.
        teacher: ``(B, C)`` target logits (no gradient flows into them).
        temperature: T >= 1 softens both distributions (LwF uses 2).
    """
    p = F.softmax(teacher.detach() / temperature, dim=1)  # (B, C)
    return -(p * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()


def as_input_of(x: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """``x`` resized and channel-converted to task ``spec``'s input shape (identity when it matches)."""
    if x.shape[1] != spec.in_channels:
        if spec.in_channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        else:
            x = x.mean(dim=1, keepdim=True).expand(-1, spec.in_channels, -1, -1)
    if x.shape[-1] != spec.input_size or x.shape[-2] != spec.input_size:
        x = F.interpolate(x, size=(spec.input_size, spec.input_size), mode="bilinear", align_corners=False)
    return x


def set_bn_eval(module: nn.Module) -> None:
    """Put every batch norm under ``module`` in eval mode (running statistics stop moving)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode whose parameters take no gradient (the teacher snapshot)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


__all__ = ["as_input_of", "distillation_loss", "frozen_copy", "set_bn_eval"]
