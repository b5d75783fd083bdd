"""MultiTaskLoader determinism and resume, eval batches, and batched augmentation."""

from __future__ import annotations

import pytest
import torch

import virtnet.data.loader as loader_mod
from virtnet.data import (
    ArrayDataset,
    AugmentSpec,
    MultiTaskLoader,
    Task,
    TaskSet,
    augment_batch,
    crop_at,
    eval_batches,
    hflip_where,
    normalize,
    random_crop,
    random_hflip,
)
from virtnet.errors import ConfigError, DataError


def make_task(
    name: str, n: int, c: int = 1, augment: AugmentSpec | None = None, multilabel: bool = False
) -> Task:
    """Images whose first pixel is the image's index (so batches can be traced back to images)."""
    images = torch.zeros(n, c, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0] = torch.arange(n, dtype=torch.uint8)[:, None]
    images[:, :, 1:, 1:] = 100
    if multilabel:
        labels = torch.stack([torch.arange(n) % 2, torch.arange(n) % 3 == 0], dim=1).float()
        mask = torch.ones(n, 2, dtype=torch.bool)
        mask[::4, 1] = False
        ds = ArrayDataset(images, labels, mask, name)
        return Task(name, ds, ds, 2, "multilabel", mean=(0.25,), std=(0.5,))
    ds = ArrayDataset(images, torch.arange(n) % 3, None, name)
    mean, std = (0.1,) * c, (0.2,) * c
    return Task(name, ds, ds, 3, mean=mean, std=std, augment=augment or AugmentSpec())


def image_ids(batch_x: torch.Tensor, task: Task) -> list[int]:
    """Recover image indices from normalised, un-augmented inputs (first pixel = index / 255)."""
    raw = batch_x[:, 0, 0, 0] * task.std[0] + task.mean[0]
    return torch.round(raw * 255).long().tolist()


@pytest.fixture
def taskset() -> TaskSet:
    return TaskSet(
        [
            make_task("a", 10, augment=AugmentSpec(1, True)),
            make_task("b", 25, c=3, augment=AugmentSpec(2, False)),
            make_task("m", 7, multilabel=True),
        ]
    )


def all_equal(xs: list[dict], ys: list[dict]) -> bool:
    if len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys, strict=True):
        if x.keys() != y.keys():
            return False
        for k in x:
            a, b = x[k], y[k]
            if not (torch.equal(a.x, b.x) and torch.equal(a.y, b.y)):
                return False
            if (a.mask is None) != (b.mask is None) or (
                a.mask is not None and not torch.equal(a.mask, b.mask)
            ):
                return False
    return True


def test_steps_per_epoch(taskset: TaskSet) -> None:
    # batches per pass: a ceil(10/4) = 3, b ceil(25/4) = 7, m ceil(7/4) = 2
    assert MultiTaskLoader(taskset, 4, 0).steps_per_epoch() == 7
    assert MultiTaskLoader(taskset, 4, 0, sampling="round_robin").steps_per_epoch() == 12
    assert MultiTaskLoader(taskset, 4, 0, sampling="proportional").steps_per_epoch() == 12
    # drop_last: 2, 6, 1
    assert MultiTaskLoader(taskset, 4, 0, drop_last=True).steps_per_epoch() == 6
    assert MultiTaskLoader(taskset, 4, 0, sampling="round_robin", drop_last=True).steps_per_epoch() == 9
    assert len(MultiTaskLoader(taskset, 4, 0, tasks=["a"])) == 3
    with pytest.raises(
        DataError, match="task 'm': 7 training images, fewer than batch_size 8 with drop_last"
    ):
        MultiTaskLoader(taskset, 8, 0, drop_last=True)
    with pytest.raises(ConfigError, match="sampling: expected one of all, round_robin, proportional"):
        MultiTaskLoader(taskset, 4, 0, sampling="random")  # type: ignore[arg-type]


def test_all_mode_every_task_every_step_and_cycles(taskset: TaskSet) -> None:
    ld = MultiTaskLoader(taskset, 4, seed=3, augment=False)
    steps = list(ld.iterate(0))
    assert len(steps) == 7
    assert all(set(s) == {"a", "b", "m"} for s in steps)
    a = taskset["a"]
    ids = [image_ids(s["a"].x, a) for s in steps]
    assert [len(i) for i in ids] == [4, 4, 2, 4, 4, 2, 4]
    # each pass over task a (cycle of 3 steps) covers each image exactly once, with a fresh permutation
    assert sorted(sum(ids[0:3], [])) == list(range(10)) and sorted(sum(ids[3:6], [])) == list(range(10))
    assert sum(ids[0:3], []) != sum(ids[3:6], [])
    b_ids = sum((image_ids(s["b"].x, taskset["b"]) for s in steps), [])
    assert sorted(b_ids) == list(range(25))
    # labels follow the images
    assert steps[0]["a"].y.tolist() == [i % 3 for i in ids[0]]
    assert steps[0]["b"].x.shape == (4, 3, 4, 4) and steps[0]["b"].x.dtype == torch.float32
    m = steps[0]["m"]
    assert m.mask is not None and m.mask.shape == m.y.shape == (4, 2)


def test_determinism_same_seed(taskset: TaskSet) -> None:
    for sampling in ("all", "round_robin", "proportional"):
        one = list(MultiTaskLoader(taskset, 4, 11, sampling=sampling).iterate(2))
        two = list(MultiTaskLoader(taskset, 4, 11, sampling=sampling).iterate(2))
        assert all_equal(one, two)
        other_seed = list(MultiTaskLoader(taskset, 4, 12, sampling=sampling).iterate(2))
        other_epoch = list(MultiTaskLoader(taskset, 4, 11, sampling=sampling).iterate(3))
        assert not all_equal(one, other_seed) and not all_equal(one, other_epoch)


@pytest.mark.parametrize("sampling", ["all", "round_robin", "proportional"])
def test_resume_equals_tail(taskset: TaskSet, sampling: str) -> None:
    ld = MultiTaskLoader(taskset, 4, 5, sampling=sampling)
    full = list(ld.iterate(1))
    for n in (0, 1, 4, len(full) - 1, len(full)):
        assert all_equal(list(ld.iterate(1, start_step=n)), full[n:])
    with pytest.raises(ConfigError, match="start_step: expected an integer in 0"):
        ld.iterate(1, start_step=len(full) + 1)


def test_resume_does_not_build_skipped_batches(taskset: TaskSet, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = loader_mod._make_batch

    def spy(task, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(task.name)
        return real(task, *args, **kwargs)

    monkeypatch.setattr(loader_mod, "_make_batch", spy)
    list(MultiTaskLoader(taskset, 4, 0).iterate(0, start_step=5))
    assert len(calls) == 2 * 3  # steps 5 and 6, three tasks each
    calls.clear()
    list(MultiTaskLoader(taskset, 4, 0, sampling="round_robin").iterate(0, start_step=10))
    assert len(calls) == 2


def test_round_robin_and_proportional_schedules(taskset: TaskSet) -> None:
    rr = MultiTaskLoader(taskset, 4, 0, sampling="round_robin", augment=False)
    order = [next(iter(s)) for s in rr.iterate(0)]
    # a: 3 batches, b: 7, m: 2 -> cycle a, b, m while each has batches left
    assert order == ["a", "b", "m", "a", "b", "m", "a", "b", "b", "b", "b", "b"]
    ids = sum((image_ids(s["a"].x, taskset["a"]) for s in rr.iterate(0) if "a" in s), [])
    assert sorted(ids) == list(range(10))
    pr = MultiTaskLoader(taskset, 4, 0, sampling="proportional")
    order = [next(iter(s)) for s in pr.iterate(0)]
    assert sorted(order) == sorted(["a"] * 3 + ["b"] * 7 + ["m"] * 2)
    assert all(len(s) == 1 for s in pr.iterate(0))


def test_restricted_loader_yields_the_same_batches(taskset: TaskSet) -> None:
    full = [s["b"] for s in MultiTaskLoader(taskset, 4, 9).iterate(0)]
    only = [s["b"] for s in MultiTaskLoader(taskset, 4, 9, tasks=["b"]).iterate(0)]
    assert len(full) == len(only) == 7
    assert all(torch.equal(x.x, y.x) and torch.equal(x.y, y.y) for x, y in zip(full, only, strict=True))
    assert MultiTaskLoader(taskset, 4, 9, tasks=[1]).task_names == ["b"]


def test_batches_are_normalised(taskset: TaskSet) -> None:
    a = taskset["a"]
    step = next(MultiTaskLoader(taskset, 4, 0, augment=False).iterate(0))
    ids = image_ids(step["a"].x, a)
    expect = (a.train.images[ids].float() / 255 - 0.1) / 0.2
    assert torch.allclose(step["a"].x, expect, atol=1e-6)


def test_eval_batches_in_order(taskset: TaskSet) -> None:
    b = taskset["b"]
    batches = list(eval_batches(taskset, "b", split="test", batch_size=10))
    assert [len(x) for x in batches] == [10, 10, 5]
    x = torch.cat([x.x for x in batches])
    assert torch.allclose(x, (b.test.images.float() / 255 - 0.1) / 0.2, atol=1e-6)
    assert torch.equal(torch.cat([x.y for x in batches]), b.test.labels)
    same = list(MultiTaskLoader(taskset, 4, 0).eval_batches("b", batch_size=10))
    assert all(torch.equal(p.x, q.x) for p, q in zip(batches, same, strict=True))
    assert len(list(eval_batches(b, batch_size=256))) == 1
    with pytest.raises(DataError, match="task 'b': no validation split"):
        list(eval_batches(b, split="val"))


# ------------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------------


def test_crop_at_hand_computed() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(4, 1, 1, 1)  # (4, 1, 2, 2)
    # padded: [[0,0,0,0],[0,1,2,0],[0,3,4,0],[0,0,0,0]]
    out = crop_at(x, 1, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 2]))
    assert out[0, 0].tolist() == [[0, 0], [0, 1]]
    assert out[1, 0].tolist() == [[1, 2], [3, 4]]
    assert out[2, 0].tolist() == [[4, 0], [0, 0]]
    assert out[3, 0].tolist() == [[0, 0], [2, 0]]
    two = torch.stack([torch.arange(9.0).view(3, 3), 10 + torch.arange(9.0).view(3, 3)]).view(1, 2, 3, 3)
    # padded rows 3..5 = image rows 1, 2 and padding; padded cols 1..3 = padding and image cols 0, 1
    o = crop_at(two, 2, torch.tensor([3]), torch.tensor([1]))
    assert o[0, 1].tolist() == [[0, 13, 14], [0, 16, 17], [0, 0, 0]]
    assert o[0, 0].tolist() == [[0, 3, 4], [0, 6, 7], [0, 0, 0]]
    with pytest.raises(DataError, match="offsets must be in 0..2"):
        crop_at(x, 1, torch.tensor([0, 0, 3, 0]), torch.zeros(4, dtype=torch.long))


def test_random_crop_draws_documented_offsets() -> None:
    x = torch.rand(6, 2, 5, 5)
    out = random_crop(x, 2, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    oy = torch.randint(0, 5, (6,), generator=g)
    ox = torch.randint(0, 5, (6,), generator=g)
    assert torch.equal(out, crop_at(x, 2, oy, ox))
    for b in range(6):  # against a per-sample slice of the padded image
        padded = torch.nn.functional.pad(x[b], (2, 2, 2, 2))
        assert torch.equal(out[b], padded[:, oy[b] : oy[b] + 5, ox[b] : ox[b] + 5])


def test_hflip_hand_computed() -> None:
    x = torch.tensor([[[[1.0, 2.0, 3.0]]], [[[4.0, 5.0, 6.0]]]])  # (2, 1, 1, 3)
    out = hflip_where(x, torch.tensor([True, False]))
    assert out[:, 0, 0].tolist() == [[3.0, 2.0, 1.0], [4.0, 5.0, 6.0]]
    y = torch.rand(8, 1, 2, 3)
    flipped = random_hflip(y, torch.Generator().manual_seed(1))
    coins = torch.rand(8, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(flipped, torch.where(coins[:, None, None, None], y.flip(-1), y))


def test_normalize_and_augment_batch_order() -> None:
    x = torch.tensor([[[[0.5]], [[1.0]]]])  # (1, 2, 1, 1)
    assert normalize(x, (0.5, 0.0), (1.0, 0.5)).flatten().tolist() == [0.0, 2.0]
    with pytest.raises(DataError, match="images have 2 channels but mean/std have 1/1 values"):
        normalize(x, (0.5,), (1.0,))
    y = torch.rand(5, 1, 4, 4)
    out = augment_batch(y, AugmentSpec(crop_padding=1, hflip=True), torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    expect = random_hflip(random_crop(y, 1, g), g)
    assert torch.equal(out, expect)
    assert augment_batch(y, AugmentSpec(), None) is y
