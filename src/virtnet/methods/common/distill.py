"""Distillation shared by the methods that keep old tasks' responses (LwF, sequential DVN): Hinton's
temperature-scaled loss, input conversion between tasks of different shapes, the frozen teacher copy, and
batch norm keyed by task (each task's running statistics kept apart from the newer tasks' data)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import MultiTaskNet, TaskSpec
from virtnet.nn import SwitchableBatchNorm, make_switchable


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


def task_norms(module: nn.Module, key: str) -> list[nn.Module]:
    """The private batch norms of configuration ``key`` in every switchable batch norm under ``module``."""
    return [m.norm(key) for m in module.modules() if isinstance(m, SwitchableBatchNorm)]


def set_task_bn_eval(module: nn.Module, keys: list[str]) -> None:
    """Freeze the running statistics of configurations ``keys``: their private batch norms normalise with
    the statistics they recorded (eval mode), as the frozen teacher does."""
    for k in keys:
        for bn in task_norms(module, k):
            bn.eval()


@contextmanager
def statistics_kept(norms: Sequence[nn.Module]) -> Iterator[None]:
    """Batch norms ``norms`` normalise as their mode says inside the block, but their running statistics
    are the same after it: the forwards update copies, and the recorded buffers are put back (swapped,
    not copied into, since autograd may hold the copies)."""
    kept = [(bn, dict(bn.named_buffers())) for bn in norms]
    for bn, saved in kept:
        for k, v in saved.items():
            setattr(bn, k, v.clone())
    try:
        yield
    finally:
        for bn, saved in kept:
            for k, v in saved.items():
                setattr(bn, k, v)


@torch.no_grad()
def copy_task_bn(module: nn.Module, src: str, dst: str) -> None:
    """Start configuration ``dst``'s private batch norms as ``src``'s (statistics, batch count and, when
    private, affine parameters)."""
    for m in module.modules():
        if isinstance(m, SwitchableBatchNorm):
            a, b = m.norm(src), m.norm(dst)
            b.load_state_dict(a.state_dict())


def install_task_bn(model: MultiTaskNet, private_affine: bool) -> int:
    """Batch norm keyed by task in the shared trunk and the shared stem of ``model``: every task keeps its
    own running statistics (and with ``private_affine`` its own scale and shift); the model's routes then
    name their task. Returns how many batch norms were replaced. Per-task stems are private already."""
    keys: dict[str, tuple[int, ...] | None] = {t: None for t in model.tasks}
    n = make_switchable(model.trunk, keys, shared_affine=not private_affine)
    if model.shared_stem:
        n += make_switchable(model.stems["shared"], keys, shared_affine=not private_affine)
    model.task_keyed = True
    return n


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode whose parameters take no gradient (the teacher snapshot)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


__all__ = [
    "as_input_of",
    "copy_task_bn",
    "distillation_loss",
    "frozen_copy",
    "install_task_bn",
    "set_bn_eval",
    "set_task_bn_eval",
    "statistics_kept",
    "task_norms",
]
