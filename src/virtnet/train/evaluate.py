"""Accuracy of every (task, level) of a model on a split, with the method's columns computed on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from virtnet.data.core import TaskSet
from virtnet.data.loader import eval_batches


def accuracy_counts(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int]:
    """(correct, total): argmax for multiclass; per-label sign for multilabel (known labels only)."""
    if y.dim() == 1:
        return int((logits.argmax(1) == y).sum()), int(y.numel())
    hit = (logits > 0) == (y > 0.5)
    if mask is not None:
        return int((hit & mask).sum()), int(mask.sum())
    return int(hit.sum()), int(hit.numel())


@torch.inference_mode()
def evaluate(
    method: Any,
    model: nn.Module,
    taskset: TaskSet,
    split: str = "test",
    tasks: list[str] | None = None,
    levels: str | list[int] = "all",
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Rows ``{"task", "level", "level_name", "split", "accuracy" (%), "correct", "total"}`` and the
    method's own columns for the row (:meth:`virtnet.methods.base.Method.eval_columns`).

    Args:
        method: the model's method (gives the levels and the forward of a level).
        levels: ``"all"`` levels of each task, ``"top"`` (the largest) or a list of level indices.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # batches are built on the CPU
    rows = []
    try:
        for task in tasks or taskset.names:
            all_levels = method.levels(model, task)
            if levels == "all":
                chosen = all_levels
            elif levels == "top":
                chosen = all_levels[-1:]
            else:
                chosen = [lv for lv in all_levels if lv.index in levels]
            batches = list(eval_batches(taskset, task, split=split, batch_size=batch_size))
            for lv in chosen:
                correct = total = 0
                for b in batches:
                    logits = method.predict(model, b.x.to(device), task, lv.index).cpu()
                    c, n = accuracy_counts(logits, b.y, b.mask)
                    correct += c
                    total += n
                row = {
                    "task": task,
                    "level": lv.index,
                    "level_name": lv.name,
                    "split": split,
                    "accuracy": 100.0 * correct / max(1, total),
                    "correct": correct,
                    "total": total,
                }
                extra = method.eval_columns(model, task, lv.index, batches)
                clash = sorted(set(extra) & set(row))
                if clash:
                    raise ValueError(
                        f"method '{method.name}': eval_columns returned the row's own keys {clash}"
                    )
                row.update(extra)
                rows.append(row)
    finally:
        model.train(was_training)
    return rows
