"""In-memory datasets, tasks and task sets.

Every dataset virtnet reads fits in memory (the largest, CIFAR-100, is 150 MB as uint8), so a dataset is a
pair of tensors rather than a per-item ``__getitem__``: batches are gathered by index, augmented and
normalised as whole tensors on the CPU, which is several times faster than a ``DataLoader`` with workers on
the 2-core machines virtnet targets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from virtnet.errors import ConfigError, DataError, TaskError

TaskKind = Literal["multiclass", "multilabel"]


@dataclass
class ArrayDataset:
    """Images and labels held as tensors.

    Attributes:
        images: ``(N, C, H, W)`` uint8 pixels.
        labels: ``(N,)`` int64 class indices (multiclass) or ``(N, A)`` float 0/1 targets (multilabel).
        mask: ``(N, A)`` bool, True where the label of attribute ``a`` is known for image ``n``
            (multilabel tasks only; None means every label is known).
        source: where the data came from, for error messages (a file or dataset name).
    """

    images: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.source or 'dataset'}: images must be a (N, C, H, W) uint8 tensor, "
                f"got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"{self.source or 'dataset'}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        if self.mask is not None and self.mask.shape != self.labels.shape:
            raise DataError(
                f"{self.source or 'dataset'}: label mask shape {tuple(self.mask.shape)} "
                f"!= labels shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor | Sequence[int]) -> ArrayDataset:
        """The images at ``index`` (a LongTensor or a sequence of ints), in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ArrayDataset(
            self.images[index],
            self.labels[index],
            None if self.mask is None else self.mask[index],
            self.source,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class AugmentSpec:
    """Training-time augmentation of a task (applied to whole batches, see ``virtnet.data.augment``)."""

    crop_padding: int = 0  # random crop of the original size after zero padding by this many pixels
    hflip: bool = False  # random horizontal flip with probability 1/2


@dataclass
class Task:
    """One task: its data splits, output space and input statistics.

    ``mean`` and ``std`` are per-channel statistics of the training images scaled to [0, 1]; inputs are
    normalised with them. ``val`` is a held-out part of the training split (None when not requested).
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_outputs: int
    kind: TaskKind = "multiclass"
    class_names: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    val: ArrayDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of this task's inputs."""
        return self.train.image_shape

    def split(self, name: str) -> ArrayDataset:
        """The ``train``, ``val`` or ``test`` split."""
        if name == "train":
            return self.train
        if name == "test":
            return self.test
        if name == "val":
            if self.val is None:
                raise DataError(f"task '{self.name}': no validation split (set val_fraction in its config)")
            return self.val
        raise DataError(f"task '{self.name}': unknown split '{name}' (expected train, val or test)")

    def check_input(self, x: torch.Tensor) -> None:
        """Raise DataError when ``x`` is not a ``(B, C, H, W)`` batch of this task's input shape."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(
                f"task '{self.name}': expected input of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )


@dataclass
class Batch:
    """A batch of one task: normalised float inputs and targets.

    Attributes:
        task: the task's name.
        x: ``(B, C, H, W)`` float32, normalised (and augmented when training).
        y: ``(B,)`` int64 or ``(B, A)`` float targets.
        mask: ``(B, A)`` bool known-label mask for multilabel tasks, else None.
    """

    task: str
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


class TaskSet:
    """An ordered collection of tasks with unique names."""

    def __init__(self, tasks: Sequence[Task], name: str = "") -> None:
        names = [t.name for t in tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise DataError(f"task set '{name}': duplicate task names {sorted(dup)}")
        if not tasks:
            raise DataError(f"task set '{name}': no tasks")
        self.tasks: list[Task] = list(tasks)
        self.name = name

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, key: str | int) -> Task:
        if isinstance(key, int):
            if not -len(self.tasks) <= key < len(self.tasks):
                raise TaskError(f"task index {key} out of range: the task set has {len(self.tasks)} tasks")
            return self.tasks[key]
        for t in self.tasks:
            if t.name == key:
                return t
        raise TaskError(f"unknown task '{key}': the task set has {self.names}")

    def __contains__(self, name: object) -> bool:
        return any(t.name == name for t in self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def choice_split(
        self, tasks: Sequence[str] | None = None, allow_test: bool = False, what: str = "levels"
    ) -> str:
        """The split a choice made from data (a level under a shared budget, a plan) is made on.

        ``"val"`` when every one of ``tasks`` (default: all) has a validation split; else ``"test"`` when
        ``allow_test`` (the caller must say so in its output), else a one-line ConfigError naming the tasks
        without one: choices are never made on the test split silently.
        """
        names = list(tasks) if tasks is not None else self.names
        missing = [n for n in names if self[n].val is None]
        if not missing:
            return "val"
        if allow_test:
            return "test"
        which = ", ".join(f"'{n}'" for n in missing)
        raise ConfigError(
            f"task{'s' if len(missing) > 1 else ''} {which}: no validation split, and {what} are chosen on "
            "val, never on the test split; train with val_fraction > 0 (data.val_fraction, default 0.1, or "
            "the task's own), or choose on the test split explicitly (--allow-test-split, allow_test=True)"
        )

    def describe(self) -> list[dict]:
        """One dict per task: name, kind, outputs, input shape and split sizes."""
        return [
            {
                "task": t.name,
                "kind": t.kind,
                "num_outputs": t.num_outputs,
                "input_shape": list(t.input_shape),
                "train": len(t.train),
                "val": 0 if t.val is None else len(t.val),
                "test": len(t.test),
            }
            for t in self.tasks
        ]
