"""Deterministic, resumable multi-task batch iteration over in-memory tasks.

:class:`MultiTaskLoader` yields, per step, a dict ``{task name: Batch}``:

- ``sampling="all"``: one batch of EVERY task per step. An epoch has ``max_t b_t`` steps, where ``b_t`` is
  task ``t``'s number of batches per pass over its training images; a smaller task starts a fresh
  permutation (cycle ``1, 2, ...``) each time it has used all its images.
- ``sampling="round_robin"``: one task per step, cycling through the tasks in order; a task that has
  used all its batches of the epoch leaves the rotation, so an epoch is one pass over every task
  (``sum_t b_t`` steps).
- ``sampling="proportional"``: one task per step, the order being a random shuffle (seeded by
  ``(seed, epoch)``) of ``b_t`` copies of each task: tasks are drawn in proportion to their size, and an
  epoch is again one pass over every task (``sum_t b_t`` steps).

Everything is a pure function of ``(seed, epoch, step)``: task ``t``'s image order in cycle ``c`` of
epoch ``e`` is ``torch.randperm`` from a generator seeded with ``(seed, e, t's name, c)``, and the
augmentation of step ``s`` from one seeded with ``(seed, e, s, t's name)``. Seeds depend on the task's name
rather than its position, so restricting the loader to some tasks (``tasks=``) does not change their
batches. ``iterate(e, start_step=n)`` therefore yields exactly what ``iterate(e)`` yields after its first
``n`` steps, without building the skipped batches (training resumes this way).

A batch gathers the uint8 images by index, scales them to [0, 1], augments them (training only, when the
task has an :class:`AugmentSpec`) and normalises them with the task's ``mean``/``std``.

Sharding (data-parallel training, ``rank``/``world_size``): every rank builds the same global batch (the
one a single process would build, augmentation included) and keeps its contiguous slice, rank ``r`` the
``r``-th of ``world_size`` equal parts; ``batch_size`` stays the global batch of a task. A batch whose size
``n`` does not divide by ``world_size`` (the last, smaller batch of a pass) is first padded to the next
multiple with the first images of the same pass's order, as ``torch.utils.data.DistributedSampler`` does:
the shards then have equal sizes, so DDP's mean of the ranks' gradients is the gradient of the padded global
batch's mean loss. A rank's batches are a pure function of ``(seed, epoch, step, rank, world_size)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from virtnet.data.augment import augment_batch
from virtnet.data.core import ArrayDataset, AugmentSpec, Batch, Task, TaskSet
from virtnet.data.scenarios import make_generator
from virtnet.errors import ConfigError, DataError, TaskError

Sampling = Literal["all", "round_robin", "proportional"]
SAMPLINGS: tuple[str, ...] = ("all", "round_robin", "proportional")


def _stats(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    c = task.input_shape[0]
    if len(task.mean) != c or len(task.std) != c:
        raise DataError(
            f"task '{task.name}': {c} input channels but mean/std have "
            f"{len(task.mean)}/{len(task.std)} values"
        )
    if any(s <= 0 for s in task.std):
        raise DataError(f"task '{task.name}': std must be positive, got {task.std}")
    mean = torch.tensor(task.mean, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(task.std, dtype=torch.float32).view(1, c, 1, 1)
    return mean, std


def _make_batch(
    task: Task,
    ds: ArrayDataset,
    idx: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator | None,
) -> Batch:
    x = ds.images[idx].float().div_(255.0)  # (B, C, H, W) in [0, 1]
    if generator is not None:
        x = augment_batch(x, task.augment, generator)
    x = x.sub_(stats[0]).div_(stats[1])  # (B, C, H, W), x is a fresh tensor: normalise in place
    y = ds.labels[idx]  # (B,) or (B, A)
    mask = None if ds.mask is None else ds.mask[idx]  # (B, A)
    return Batch(task.name, x, y, mask)


class MultiTaskLoader:
    """Training batches of several tasks, deterministic from ``(seed, epoch, step)``.

    Args:
        taskset: the tasks (a TaskSet or a sequence of tasks).
        batch_size: images per batch of one task.
        seed: the run seed.
        sampling: ``all``, ``round_robin`` or ``proportional`` (see the module docstring).
        augment: apply each task's :class:`AugmentSpec` (False: plain normalised images).
        drop_last: drop the incomplete last batch of each pass over a task.
        tasks: restrict the loader to these tasks (names or indices into ``taskset``), e.g. the current
            task of a sequential phase.
        rank, world_size: yield rank ``rank``'s shard of every global batch (see the module docstring);
            ``world_size`` must divide ``batch_size``.

    Raises:
        ConfigError: invalid batch size, seed or sampling.
        TaskError: an unknown task in ``tasks``.
        DataError: a task with no training images, or fewer than ``batch_size`` with ``drop_last``.
    """

    def __init__(
        self,
        taskset: TaskSet | Sequence[Task],
        batch_size: int,
        seed: int,
        sampling: Sampling = "all",
        augment: bool = True,
        drop_last: bool = False,
        tasks: Sequence[str | int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        ts = taskset if isinstance(taskset, TaskSet) else TaskSet(list(taskset))
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world size")
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size: {batch_size} (the global batch per task) does not divide among "
                f"{world_size} processes; use a multiple of {world_size}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"sampling: expected one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        if tasks is None:
            chosen = list(ts.tasks)
        else:
            if isinstance(tasks, str) or not tasks:
                raise TaskError(f"tasks: expected a non-empty list of task names or indices, got {tasks!r}")
            chosen = [ts[t] for t in tasks]
            names = [t.name for t in chosen]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise TaskError(f"tasks: task '{dup[0]}' is listed twice")
        self.tasks: list[Task] = chosen
        self.batch_size = batch_size
        self.seed = seed
        self.sampling: str = sampling
        self.augment = augment
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self._stats = [_stats(t) for t in self.tasks]
        self._nbatches: list[int] = []
        for t in self.tasks:
            n = len(t.train)
            b = n // batch_size if drop_last else math.ceil(n / batch_size)
            if b == 0:
                if n == 0:
                    raise DataError(f"task '{t.name}': no training images")
                raise DataError(
                    f"task '{t.name}': {n} training images, fewer than batch_size {batch_size} with drop_last"
                )
            self._nbatches.append(b)

    @property
    def task_names(self) -> list[str]:
        """Names of the tasks this loader yields."""
        return [t.name for t in self.tasks]

    def batches_per_pass(self) -> dict[str, int]:
        """``{task: b_t}``: batches in one pass over each task's training images."""
        return {t.name: b for t, b in zip(self.tasks, self._nbatches, strict=True)}

    def steps_per_epoch(self) -> int:
        """Steps of one epoch: ``max_t b_t`` for ``all``, ``sum_t b_t`` otherwise."""
        if self.sampling == "all":
            return max(self._nbatches)
        return sum(self._nbatches)

    def __len__(self) -> int:
        return self.steps_per_epoch()

    def schedule(self, epoch: int) -> list[int]:
        """Task index (into ``self.tasks``) of every step of ``epoch`` (``round_robin``/``proportional``)."""
        if self.sampling == "all":
            raise ConfigError("schedule: sampling 'all' yields every task at every step")
        if self.sampling == "round_robin":
            out: list[int] = []
            for r in range(max(self._nbatches)):
                out.extend(i for i, b in enumerate(self._nbatches) if r < b)
            return out
        bag = torch.cat([torch.full((b,), i, dtype=torch.long) for i, b in enumerate(self._nbatches)])
        perm = torch.randperm(len(bag), generator=make_generator(self.seed, epoch, "schedule"))
        return bag[perm].tolist()

    def _perm(self, epoch: int, ti: int, cycle: int) -> torch.Tensor:
        n = len(self.tasks[ti].train)
        return torch.randperm(n, generator=make_generator(self.seed, epoch, self.tasks[ti].name, cycle))

    def _batch(
        self, epoch: int, step: int, ti: int, j: int, cache: dict[int, tuple[int, torch.Tensor]]
    ) -> Batch:
        """Task ``ti``'s ``j``-th batch of the epoch (cycle ``j // b``), built at loader step ``step``."""
        task = self.tasks[ti]
        b = self._nbatches[ti]
        cycle, k = divmod(j, b)
        if ti not in cache or cache[ti][0] != cycle:
            cache[ti] = (cycle, self._perm(epoch, ti, cycle))
        perm = cache[ti][1]
        idx = perm[k * self.batch_size : (k + 1) * self.batch_size]  # (B,)
        gen = None
        if self.augment and task.augment != AugmentSpec():
            gen = make_generator(self.seed, epoch, step, task.name, "augment")
        if self.world_size == 1:
            return _make_batch(task, task.train, idx, self._stats[ti], gen)
        return self._shard(task, perm, idx, ti, gen)

    def _shard(
        self, task: Task, perm: torch.Tensor, idx: torch.Tensor, ti: int, gen: torch.Generator | None
    ) -> Batch:
        """This rank's slice of the global batch ``idx``, padded to a multiple of the world size with the
        first images of the pass's order ``perm``."""
        w = self.world_size
        pad = -len(idx) % w
        if pad:
            idx = torch.cat([idx, perm[torch.arange(pad) % len(perm)]])
        part = len(idx) // w
        lo, hi = self.rank * part, (self.rank + 1) * part
        if gen is None:  # no augmentation: only this rank's images need building
            return _make_batch(task, task.train, idx[lo:hi], self._stats[ti], None)
        b = _make_batch(task, task.train, idx, self._stats[ti], gen)  # augmentation draws for the whole batch
        return Batch(b.task, b.x[lo:hi], b.y[lo:hi], None if b.mask is None else b.mask[lo:hi])

    def iterate(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Batch]]:
        """The batches of ``epoch`` from ``start_step`` on.

        Args:
            epoch: the epoch (>= 0); each epoch has its own permutations.
            start_step: skip the first ``start_step`` steps without building their batches.

        Yields:
            ``{task name: Batch}``: every task (``all``) or one task per step.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch: expected a non-negative integer, got {epoch!r}")
        steps = self.steps_per_epoch()
        if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= steps:
            raise ConfigError(f"start_step: expected an integer in 0..{steps}, got {start_step!r}")
        return self._iterate(epoch, start_step, steps)

    def _iterate(self, epoch: int, start_step: int, steps: int) -> Iterator[dict[str, Batch]]:
        cache: dict[int, tuple[int, torch.Tensor]] = {}
        if self.sampling == "all":
            for s in range(start_step, steps):
                yield {t.name: self._batch(epoch, s, i, s, cache) for i, t in enumerate(self.tasks)}
            return
        sched = self.schedule(epoch)
        seen = [0] * len(self.tasks)
        for ti in sched[:start_step]:
            seen[ti] += 1
        for s in range(start_step, steps):
            ti = sched[s]
            batch = self._batch(epoch, s, ti, seen[ti], cache)
            seen[ti] += 1
            yield {self.tasks[ti].name: batch}

    def eval_batches(self, task: str | int, split: str = "test", batch_size: int = 256) -> Iterator[Batch]:
        """:func:`eval_batches` of one of this loader's tasks."""
        names = self.task_names
        if isinstance(task, str):
            if task not in names:
                raise TaskError(f"unknown task '{task}': the loader has {names}")
            t = self.tasks[names.index(task)]
        else:
            t = TaskSet(self.tasks)[task]
        return eval_batches(t, split=split, batch_size=batch_size)


def eval_batches(
    taskset_or_task: TaskSet | Task,
    task: str | int | None = None,
    split: str = "test",
    batch_size: int = 256,
) -> Iterator[Batch]:
    """Evaluation batches of one task: in order, not augmented, normalised with the task's mean/std.

    Args:
        taskset_or_task: a task, or a task set with ``task`` naming one of its tasks.
        task: the task's name or index (required with a task set; must match a given task's name).
        split: ``train``, ``val`` or ``test``.
        batch_size: images per batch (the last may be smaller).

    Yields:
        Batches covering the split's images ``0..N-1`` in order.
    """
    if isinstance(taskset_or_task, TaskSet):
        if task is None:
            raise TaskError(f"eval_batches: name the task (the task set has {taskset_or_task.names})")
        t = taskset_or_task[task]
    else:
        t = taskset_or_task
        if task is not None and task != t.name and task != 0:
            raise TaskError(f"eval_batches: task {task!r} given with task '{t.name}'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    ds = t.split(split)
    stats = _stats(t)

    def gen() -> Iterator[Batch]:
        for start in range(0, len(ds), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(ds)))  # (B,)
            yield _make_batch(t, ds, idx, stats, None)

    return gen()


__all__ = ["SAMPLINGS", "MultiTaskLoader", "Sampling", "eval_batches"]
