"""Shared fixtures: small task sets made in memory (no files, no network).

The suite fixes its own threads at import: one intra-op and one inter-op torch thread, and
``VIRTNET_THREADS=1`` for the CLI and ``api.train`` (which otherwise choose by the load, see
virtnet.threads), so ``make test`` runs at the same speed on an idle and on a busy machine.
"""

from __future__ import annotations

import os

import pytest
import torch

from virtnet.data.core import ArrayDataset, Task, TaskSet

os.environ.setdefault("VIRTNET_THREADS", "1")
torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # parallel work already started (another plugin): keep the pool
    pass


def pattern_dataset(n: int, classes: int, channels: int, size: int, seed: int, source: str) -> ArrayDataset:
    """Images whose class sets a bright square's position, plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 60, (n, channels, size, size), generator=g)
    half = max(1, size // 2)
    for c in range(classes):
        r, col = divmod(c % 4, 2)
        sel = labels == c
        images[sel, :, r * half : (r + 1) * half, col * half : (col + 1) * half] += 150 + 20 * (c // 4)
    return ArrayDataset(images.clamp(0, 255).to(torch.uint8), labels.long(), source=source)


def make_taskset(
    shapes=((1, 8), (1, 8)), classes: int = 3, n_train: int = 48, n_test: int = 24, seed: int = 0
) -> TaskSet:
    tasks = []
    for i, (c, s) in enumerate(shapes):
        tr = pattern_dataset(n_train, classes, c, s, seed + 10 * i, f"task{i}/train")
        te = pattern_dataset(n_test, classes, c, s, seed + 10 * i + 1, f"task{i}/test")
        mean = tuple(float(v) for v in (tr.images.float() / 255).mean(dim=(0, 2, 3)))
        std = tuple(float(v) for v in (tr.images.float() / 255).std(dim=(0, 2, 3)))
        tasks.append(
            Task(f"t{i}", tr, te, classes, class_names=[str(k) for k in range(classes)], mean=mean, std=std)
        )
    return TaskSet(tasks, "patterns")


@pytest.fixture
def taskset() -> TaskSet:
    return make_taskset()
