"""Scenario builders and the data config, on synthetic data and small files written by the tests."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from virtnet.config import validate
from virtnet.data import (
    FASHION_MNIST_COARSE,
    AugmentSpec,
    DataConfig,
    attribute_task,
    build_taskset,
    channel_stats,
    coarse_fine,
    datasets_as_tasks,
    load_synthetic,
    make_task,
    split_classes,
    stratified_take,
)
from virtnet.errors import ConfigError, DataError


def synth(k: int = 6, n_train: int = 120, n_test: int = 60, seed: int = 0):  # noqa: ANN201
    return load_synthetic(num_classes=k, num_train=n_train, num_test=n_test, size=5, seed=seed)


def image_keys(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


def rows_of(sub: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Index in ``full`` of every image of ``sub`` (images are unique)."""
    where = {k: i for i, k in enumerate(image_keys(full))}
    return [where[k] for k in image_keys(sub)]


def write_fake_fashion(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = []
    for split, n in (("train", 40), ("t10k", 20)):
        x = rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            magic = (0x800 | arr.ndim).to_bytes(4, "big")
            dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(magic + dims + arr.tobytes()))
        out.append(y)
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def test_stratified_take_hand_computed() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    take, rest = stratified_take(labels, 3, torch.Generator().manual_seed(0))
    # class 0: 3*3//6 = 1 (rem 3), class 1: 3*2//6 = 1 (rem 0), class 2: 3*1//6 = 0 (rem 3)
    # the extra pick goes to the largest remainder, ties to the smaller label: class 0
    assert torch.bincount(labels[take], minlength=3).tolist() == [2, 1, 0]
    assert sorted(take.tolist() + rest.tolist()) == list(range(6))
    assert take.tolist() == sorted(take.tolist())


def test_channel_stats_hand_computed() -> None:
    img = torch.tensor([[[[0, 255], [255, 255]], [[51, 51], [51, 51]]]], dtype=torch.uint8)  # (1, 2, 2, 2)
    img[0, 1, 0, 0] = 102
    mean, std = channel_stats(img)
    assert mean[0] == pytest.approx(0.75) and std[0] == pytest.approx(0.1875**0.5)
    # channel 1: values 0.4, 0.2, 0.2, 0.2 -> mean 0.25, var 0.0075
    assert mean[1] == pytest.approx(0.25) and std[1] == pytest.approx(0.0075**0.5)
    with pytest.raises(DataError, match="channel 0 is constant"):
        channel_stats(torch.zeros(2, 1, 2, 2, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------------
# split classes
# ------------------------------------------------------------------------------------------------------


def test_split_classes_equal_splits_exact_labels() -> None:
    d = synth()
    ts = split_classes(d, num_tasks=3)
    assert ts.names == ["synthetic_0", "synthetic_1", "synthetic_2"]
    for i, t in enumerate(ts):
        assert t.num_outputs == 2 and t.class_names == [f"class{2 * i}", f"class{2 * i + 1}"]
        keep = (d.train.labels == 2 * i) | (d.train.labels == 2 * i + 1)
        assert torch.equal(t.train.images, d.train.images[keep])
        assert torch.equal(t.train.labels, d.train.labels[keep] - 2 * i)
        keep_te = (d.test.labels == 2 * i) | (d.test.labels == 2 * i + 1)
        assert torch.equal(t.test.labels, d.test.labels[keep_te] - 2 * i)


def test_split_classes_explicit_order_remaps_labels() -> None:
    d = synth()
    ts = split_classes(d, splits=[[5, 1], [0, 2, 3]], prefix="s")
    assert ts.names == ["s_0", "s_1"]
    t0, t1 = ts[0], ts[1]
    src = d.train.labels[rows_of(t0.train.images, d.train.images)]
    assert torch.equal(t0.train.labels, torch.where(src == 5, 0, 1))
    assert t0.class_names == ["class5", "class1"]
    src1 = d.test.labels[rows_of(t1.test.images, d.test.images)]
    lut = {0: 0, 2: 1, 3: 2}
    assert t1.test.labels.tolist() == [lut[int(c)] for c in src1]
    with pytest.raises(ConfigError, match=r"split_classes.splits\[1\]: class 1 is already in splits\[0\]"):
        split_classes(d, splits=[[0, 1], [1, 2]])
    with pytest.raises(ConfigError, match="4 does not divide the 6 classes of synthetic"):
        split_classes(d, num_tasks=4)


def test_no_image_shared_between_splits() -> None:
    d = synth(k=4, n_train=200, n_test=80)
    assert len(set(image_keys(torch.cat([d.train.images, d.test.images])))) == 280  # no duplicates
    ts = split_classes(d, num_tasks=2, val_fraction=0.25, train_size=80, test_size=30, seed=3)
    for t in ts:
        assert t.val is not None
        tr, va, te = (set(image_keys(s.images)) for s in (t.train, t.val, t.test))
        assert len(tr) == len(t.train) and tr.isdisjoint(va) and tr.isdisjoint(te) and va.isdisjoint(te)
        assert tr | va <= set(image_keys(d.train.images)) and te <= set(image_keys(d.test.images))


def test_subsampling_sizes_are_exact_and_stratified() -> None:
    d = synth(k=6, n_train=120, n_test=60)
    t = make_task("t", d, train_size=30, test_size=12, val_fraction=0.2, seed=1)
    assert len(t.train) + len(t.val or []) == 30 and len(t.val or []) == 6 and len(t.test) == 12
    full = torch.cat([t.train.labels, t.val.labels])  # type: ignore[union-attr]
    assert torch.bincount(full, minlength=6).tolist() == [5] * 6
    assert torch.bincount(t.val.labels, minlength=6).tolist() == [1] * 6  # type: ignore[union-attr]
    assert torch.bincount(t.test.labels, minlength=6).tolist() == [2] * 6
    again = make_task("t", d, train_size=30, test_size=12, val_fraction=0.2, seed=1)
    assert torch.equal(again.train.images, t.train.images)
    other = make_task("t", d, train_size=30, seed=2)
    assert not torch.equal(other.train.images, torch.cat([t.train.images, t.val.images]))  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"task 't': train_size: 500 > the 120 train images"):
        make_task("t", d, train_size=500)


def test_task_mean_std_from_final_train_images() -> None:
    d = synth()
    t = make_task("t", d, classes=[1, 2], val_fraction=0.5, augment=AugmentSpec(2, True))
    x = t.train.images.double() / 255
    assert t.mean[0] == pytest.approx(float(x.mean()))
    assert t.std[0] == pytest.approx(float(x.std(unbiased=False)))
    assert t.augment == AugmentSpec(2, True)


# ------------------------------------------------------------------------------------------------------
# coarse / fine, label maps, attributes
# ------------------------------------------------------------------------------------------------------


def test_label_map_coarse_grouping() -> None:
    d = load_synthetic(num_classes=10, num_train=100, num_test=50, size=4)
    t = make_task("g", d, label_map=FASHION_MNIST_COARSE)
    assert t.num_outputs == 4
    expect = [FASHION_MNIST_COARSE[int(c)] for c in d.train.labels]
    assert t.train.labels.tolist() == expect
    assert t.class_names[2] == "class5+class7+class9"
    with pytest.raises(ConfigError, match=r"label_map: does not cover class 9"):
        make_task("g", d, label_map={c: 0 if c < 5 else 1 for c in range(9)})
    with pytest.raises(
        ConfigError, match=r"label_map: new labels must be 0..m-1 with none unused, got \[0, 2\]"
    ):
        make_task("g", d, classes=[0, 1], label_map={0: 0, 1: 2})


def test_fashion_coarse_fine_tasks(tmp_path: Path) -> None:
    ytr, yte = write_fake_fashion(tmp_path)
    cfg = DataConfig.model_validate(
        {
            "root": str(tmp_path),
            "val_fraction": 0,  # every training image, in file order
            "scenario": {"kind": "coarse_fine", "dataset": "fashion_mnist"},
        }
    )
    ts = build_taskset(cfg, seed=0)
    assert ts.names == ["fashion_mnist_coarse", "fashion_mnist_fine"]
    coarse, fine = ts[0], ts[1]
    assert coarse.num_outputs == 4 and fine.num_outputs == 10
    group = {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 2, 7: 2, 9: 2, 8: 3}
    assert coarse.train.labels.tolist() == [group[int(c)] for c in ytr]
    assert fine.test.labels.tolist() == yte.tolist()
    assert torch.equal(coarse.train.images, fine.train.images)


def test_coarse_fine_same_images_when_subsampled(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    fine = np.arange(200) % 100
    coarse_of = np.arange(100) % 20
    for split, n in (("train", 200), ("test", 100)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": fine[:n].tolist()}
        d[b"coarse_labels"] = coarse_of[fine[:n]].tolist()
        (folder / split).write_bytes(pickle.dumps(d, protocol=2))
    meta = {
        b"fine_label_names": [b"f%d" % i for i in range(100)],
        b"coarse_label_names": [b"c%d" % i for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    from virtnet.data import load_cifar100

    ts = coarse_fine(load_cifar100(tmp_path), train_size=100, val_fraction=0.2, seed=7)
    c, f = ts[0], ts[1]
    assert c.num_outputs == 20 and f.num_outputs == 100
    assert torch.equal(c.train.images, f.train.images) and len(c.train) == 80
    assert torch.equal(c.val.images, f.val.images)  # type: ignore[union-attr]
    assert torch.equal(c.train.labels, torch.from_numpy(coarse_of)[f.train.labels])


def test_attribute_task_labels_and_mask() -> None:
    d = synth(k=4, n_train=40, n_test=20)
    attrs = {"even": [0, 2], "three": {"positive": [3], "labelled": [2, 3]}}
    ts = attribute_task(d, attrs)
    t = ts[0]
    assert t.name == "synthetic_attributes" and t.kind == "multilabel" and t.num_outputs == 2
    assert t.class_names == ["even", "three"]
    src = d.train.labels
    assert t.train.labels.dtype == torch.float32 and t.train.labels.shape == (40, 2)
    assert t.train.labels[:, 0].tolist() == [1.0 if int(c) in (0, 2) else 0.0 for c in src]
    assert t.train.labels[:, 1].tolist() == [1.0 if int(c) == 3 else 0.0 for c in src]
    assert t.train.mask is not None and t.train.mask.dtype == torch.bool
    assert t.train.mask[:, 0].all()
    assert t.train.mask[:, 1].tolist() == [int(c) in (2, 3) for c in src]
    # every label known -> no mask
    assert attribute_task(d, {"even": [0, 2]})[0].train.mask is None
    with pytest.raises(
        ConfigError, match=r"attributes.three.positive: class 3 is positive but not in labelled"
    ):
        attribute_task(d, {"three": {"positive": [3], "labelled": [2]}})


def test_datasets_as_tasks_mixed_shapes() -> None:
    a = load_synthetic(num_classes=3, channels=1, size=4, num_train=30, num_test=9)
    b = load_synthetic(num_classes=5, channels=3, size=6, num_train=50, num_test=10, seed=1)
    ts = datasets_as_tasks({"gray": a, "color": b})
    assert ts.names == ["gray", "color"]
    assert ts["gray"].input_shape == (1, 4, 4) and ts["color"].input_shape == (3, 6, 6)
    assert len(ts["color"].mean) == 3 and ts["color"].num_outputs == 5


# ------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------


def bad(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate(DataConfig, cfg, "data", "run.yaml")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_config_errors_name_the_key() -> None:
    t = {"dataset": "fashion_mnist"}
    assert bad({"tasks": [t, {"dataset": "fashion_mnist", "name": "f2", "classes": [1, 12]}]}) == (
        "run.yaml: data.tasks[1].classes: class 12 does not exist in fashion_mnist (10 classes)"
    )
    assert (
        bad({"tasks": [{"dataset": "mnist", "colour": 1}]}) == "run.yaml: data.tasks[0].colour: unknown key"
    )
    assert bad({"tasks": [t], "shuffle": True}) == "run.yaml: data.shuffle: unknown key"
    assert bad({"tasks": [{"dataset": "svhn"}]}) == (
        "run.yaml: data.tasks[0].dataset: unknown dataset 'svhn' (known: cifar10, cifar100, digits, "
        "fashion_mnist, folder, kmnist, kmnist10k, mnist, npz, synthetic)"
    )
    assert bad({"tasks": []}) == "run.yaml: data.tasks: no tasks: give data.scenario or data.tasks"
    assert bad({"tasks": [t, t]}) == (
        "run.yaml: data.tasks: task name 'fashion_mnist' is used twice (tasks[0] and tasks[1]); "
        "set distinct names"
    )
    assert bad({"tasks": [{"dataset": "mnist", "classes": [0, 1, 2], "label_map": {0: 0, 1: 1}}]}) == (
        "run.yaml: data.tasks[0].label_map: does not cover class 2 (selected classes: [0, 1, 2])"
    )
    assert bad({"tasks": [{"dataset": "mnist", "label": "coarse"}]}).startswith(
        "run.yaml: data.tasks[0].label: mnist has no coarse labels"
    )
    assert bad({"tasks": [{"dataset": "mnist", "options": {"size": 3}}]}) == (
        "run.yaml: data.tasks[0].options: unknown option 'size' for dataset mnist (options: none)"
    )
    assert bad({"tasks": [{"dataset": "mnist", "name": "a.b"}]}).startswith(
        "run.yaml: data.tasks[0].name: task name 'a.b' must match"
    )
    assert bad({"tasks": [{"dataset": "mnist", "attributes": {"round": [0, 12]}}]}) == (
        "run.yaml: data.tasks[0].attributes: round.positive: class 12 does not exist in mnist (10 classes)"
    )
    assert bad({"scenario": {"kind": "split_classes", "dataset": "digits", "num_tasks": 3}}) == (
        "run.yaml: data.scenario.num_tasks: 3 does not divide the 10 classes of digits "
        "(give splits explicitly)"
    )
    assert bad({"scenario": {"kind": "split_classes", "dataset": "digits"}}) == (
        "run.yaml: data.scenario.splits: give exactly one of num_tasks and splits"
    )
    assert bad({"scenario": {"kind": "coarse_fine", "dataset": "cifar100", "num_tasks": 2}}) == (
        "run.yaml: data.scenario.num_tasks: not used by kind coarse_fine (used by: split_classes)"
    )
    assert (
        bad(
            {
                "scenario": {"kind": "split_classes", "dataset": "digits", "num_tasks": 2},
                "tasks": [{"dataset": "digits", "name": "digits_1"}],
            }
        )
        == "run.yaml: data.tasks: task name 'digits_1' is used twice (scenario and tasks[0]); "
        "set distinct names"
    )


def test_config_split_classes_builds_exact_tasks() -> None:
    cfg = validate(
        DataConfig,
        {
            "sampling": "round_robin",
            "scenario": {
                "kind": "split_classes",
                "dataset": "synthetic",
                "options": {"num_classes": 4},
                "splits": [[3, 0], [1, 2]],
                "val_fraction": 0.1,
                "augment": {"crop_padding": 1},
            },
            "tasks": [
                {
                    "name": "extra",
                    "dataset": "synthetic",
                    "options": {"num_classes": 4},
                    "classes": [2],
                    "label_map": {2: 0},
                    "train_size": 10,
                }
            ],
        },
    )
    ts = build_taskset(cfg, seed=0)
    assert ts.names == ["synthetic_0", "synthetic_1", "extra"] and cfg.sampling == "round_robin"
    d = load_synthetic(num_classes=4)
    t0 = ts[0]
    keep = (d.test.labels == 3) | (d.test.labels == 0)
    assert torch.equal(t0.test.images, d.test.images[keep])
    assert t0.test.labels.tolist() == [0 if int(c) == 3 else 1 for c in d.test.labels[keep]]
    assert t0.augment == AugmentSpec(crop_padding=1) and t0.val is not None and len(t0.val) == 10
    # extra has no val_fraction of its own: data.val_fraction (0.1) of its 10 images is its val split
    assert len(ts["extra"].train) == 9 and len(ts["extra"].val or []) == 1 and ts["extra"].num_outputs == 1
    # same seed, same task set
    again = build_taskset(cfg, seed=0)
    assert torch.equal(again[0].train.images, t0.train.images)


def test_config_class_checked_at_build_for_folder_datasets(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.full((3, 3), 10 if c == "a" else 200, np.uint8)).save(
                tmp_path / split / c / "0.png"
            )
    cfg = validate(
        DataConfig, {"root": str(tmp_path), "tasks": [{"dataset": "folder", "classes": [0, 5]}]}, "data"
    )
    with pytest.raises(
        ConfigError, match=r"^data.tasks\[0\].classes: class 5 does not exist in folder \(2 classes\)$"
    ):
        build_taskset(cfg, 0)
    cfg = validate(
        DataConfig, {"tasks": [{"dataset": "folder", "root": str(tmp_path), "options": {"channels": 2}}]}
    )
    with pytest.raises(ConfigError, match=r"^data.tasks\[0\].options: channels must be 1 or 3, got 2$"):
        build_taskset(cfg, 0)
    ok = validate(DataConfig, {"tasks": [{"dataset": "folder", "root": str(tmp_path), "classes": [1, 0]}]})
    t = build_taskset(ok, 0)[0]
    assert t.train.labels.tolist() == [1, 0] and t.class_names == ["b", "a"]


# ------------------------------------------------------------------------------------------------------
# per-task transforms, shared subsamples, custom coarse groupings (issue 15, deliverable 8)
# ------------------------------------------------------------------------------------------------------


def test_pixel_permutation_is_a_seeded_permutation() -> None:
    from virtnet.data.transforms import permute_pixels, pixel_permutation

    p = pixel_permutation(28, 28, seed=3)
    assert p.dtype == torch.long and torch.equal(torch.sort(p).values, torch.arange(784))
    assert torch.equal(p, pixel_permutation(28, 28, seed=3))  # the same for the same seed
    assert not torch.equal(p, pixel_permutation(28, 28, seed=4))
    x = torch.randint(0, 256, (5, 2, 4, 3), dtype=torch.uint8)
    y = permute_pixels(x, seed=1)
    perm = pixel_permutation(4, 3, seed=1)
    assert torch.equal(y.reshape(5, 2, 12), x.reshape(5, 2, 12)[:, :, perm])  # the same for every channel
    assert torch.equal(
        torch.sort(y.reshape(5, 2, 12), dim=2).values, torch.sort(x.reshape(5, 2, 12), dim=2).values
    )


def test_rotation_by_quarters_is_rot90_and_the_general_path_agrees() -> None:
    from virtnet.data.transforms import rotate

    x = torch.randint(0, 256, (4, 3, 7, 7), dtype=torch.uint8)
    assert torch.equal(rotate(x, 90), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(rotate(x, -90), torch.rot90(x, -1, dims=(-2, -1)))
    assert torch.equal(rotate(x, 540), torch.rot90(x, 2, dims=(-2, -1)))
    assert torch.equal(rotate(x, 0), x)
    # any other angle goes through grid sampling: just off 90 degrees it gives the same images
    for mode in ("nearest", "bilinear"):
        assert torch.equal(rotate(x, 90 + 1e-5, mode), torch.rot90(x, 1, dims=(-2, -1)))
    y = rotate(x, 45)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert int(y[:, :, 0, 0].max()) == 0  # corners come from outside the image: zero
    assert int(y[:, :, 3, 3].ne(x[:, :, 3, 3]).sum()) == 0  # the centre stays


def permuted_cfg(**extra: object) -> dict:
    tasks = [
        {"name": f"perm{i}", "dataset": "synthetic", "options": {"num_classes": 4, "size": 6}, **extra}
        for i in range(3)
    ]
    tasks[1]["transforms"] = [{"kind": "permute_pixels", "seed": 1}]
    tasks[2]["transforms"] = [{"kind": "rotate", "degrees": 90}]
    return {"val_fraction": 0, "tasks": tasks}  # every task's whole training split


def test_config_transforms_give_a_domain_incremental_sequence() -> None:
    from virtnet.data.transforms import pixel_permutation

    cfg = validate(DataConfig, permuted_cfg(), "data")
    ts = build_taskset(cfg, seed=0)
    base, perm, rot = ts[0], ts[1], ts[2]
    assert base.num_outputs == perm.num_outputs == rot.num_outputs == 4  # the same classes, a head each
    p = pixel_permutation(6, 6, seed=1)
    for split in ("train", "test"):
        b, q, r = (getattr(t, split) for t in (base, perm, rot))
        assert torch.equal(q.images.reshape(len(q), 1, 36), b.images.reshape(len(b), 1, 36)[:, :, p])
        assert torch.equal(r.images, torch.rot90(b.images, 1, dims=(-2, -1)))
        assert torch.equal(q.labels, b.labels) and torch.equal(r.labels, b.labels)
    x = perm.train.images.double() / 255  # statistics of the transformed images
    assert perm.mean[0] == pytest.approx(float(x.mean()))
    # the permutation depends on its own seed only, not the run's
    assert torch.equal(build_taskset(cfg, seed=5)[1].test.images, perm.test.images)


def test_config_transform_errors_name_the_key() -> None:
    t = {"dataset": "mnist"}
    assert bad({"tasks": [{**t, "transforms": [{"kind": "permute_pixels"}]}]}) == (
        "run.yaml: data.tasks[0].transforms[0].seed: required for kind permute_pixels"
    )
    assert bad({"tasks": [{**t, "transforms": [{"kind": "rotate", "degrees": 10, "seed": 1}]}]}) == (
        "run.yaml: data.tasks[0].transforms[0].seed: not used by kind rotate "
        "(used by: permute_pixels, channels with mode colorize)"
    )
    assert bad({"tasks": [{**t, "transforms": [{"kind": "rotate"}]}]}) == (
        "run.yaml: data.tasks[0].transforms[0].degrees: required for kind rotate"
    )
    assert bad({"tasks": [{**t, "transforms": [{"kind": "flip"}]}]}).startswith(
        "run.yaml: data.tasks[0].transforms[0].kind: "
    )
    assert bad({"tasks": [{**t, "transforms": [{"kind": "permute_pixels", "seed": True}]}]}).startswith(
        "run.yaml: data.tasks[0].transforms[0].seed: "
    )
    assert bad({"tasks": [{**t, "transforms": [{"kind": "permute_pixels", "seed": 1, "scale": 2}]}]}) == (
        "run.yaml: data.tasks[0].transforms[0].scale: unknown key"
    )
    assert bad({"tasks": [{**t, "transforms": [{"kind": "permute_pixels", "seed": 1, "size": 2}]}]}) == (
        "run.yaml: data.tasks[0].transforms[0].size: not used by kind permute_pixels (used by: resize)"
    )


def test_subsample_group_shares_the_images(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)
    common = {"dataset": "fashion_mnist", "train_size": 20, "test_size": 10, "val_fraction": 0.25}
    cfg = validate(
        DataConfig,
        {
            "root": str(tmp_path),
            "tasks": [
                {"name": "coarse", "label": "coarse", "subsample_group": "g", **common},
                {"name": "fine", "subsample_group": "g", **common},
                {"name": "alone", **common},
            ],
        },
        "data",
    )
    ts = build_taskset(cfg, seed=3)
    full = load_dataset_fashion(tmp_path)
    c, f, a = ts["coarse"], ts["fine"], ts["alone"]
    for split, src in (("train", full.train), ("val", full.train), ("test", full.test)):
        ic, i_f = rows_of(getattr(c, split).images, src.images), rows_of(getattr(f, split).images, src.images)
        assert ic == i_f  # identical image indices for both tasks
    assert len(c.train) == 15 and len(c.val) == 5 and len(c.test) == 10  # type: ignore[arg-type]
    group = {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 2, 7: 2, 9: 2, 8: 3}
    assert c.train.labels.tolist() == [group[int(y)] for y in f.train.labels]
    # without the group a task draws its own subsample
    assert rows_of(a.train.images, full.train.images) != rows_of(f.train.images, full.train.images)


def load_dataset_fashion(root: Path):  # noqa: ANN201
    from virtnet.data import load_dataset

    return load_dataset("fashion_mnist", str(root))


def test_subsample_group_errors_name_the_key() -> None:
    a = {"name": "a", "dataset": "mnist", "train_size": 100, "subsample_group": "g"}
    assert bad({"tasks": [a, {**a, "name": "b", "train_size": 50}]}) == (
        "run.yaml: data.tasks: tasks[1].train_size: 50 differs from tasks[0]'s 100, and both are in "
        "subsample_group 'g' (a group shares one subsample of one dataset)"
    )
    assert bad({"tasks": [a, {**a, "name": "b", "dataset": "kmnist"}]}).startswith(
        "run.yaml: data.tasks: tasks[1].dataset: 'kmnist' differs from tasks[0]'s 'mnist'"
    )
    assert bad({"tasks": [a, {**a, "name": "b", "classes": [0, 1]}]}).startswith(
        "run.yaml: data.tasks: tasks[1].classes: subsample_group 'g' needs the same images in every task"
    )
    assert bad({"tasks": [{**a, "subsample_group": "a b"}]}).startswith(
        "run.yaml: data.tasks[0].subsample_group: group name 'a b' must match"
    )
    # the same classes of the same label, or all classes with either label: fine
    validate(DataConfig, {"tasks": [{**a, "classes": [1, 2]}, {**a, "name": "b", "classes": [1, 2]}]})


def test_coarse_fine_with_a_custom_grouping(tmp_path: Path) -> None:
    _, yte = write_fake_fashion(tmp_path)
    groups = {c: c % 2 for c in range(10)}  # even / odd
    cfg = validate(
        DataConfig,
        {
            "root": str(tmp_path),
            "scenario": {
                "kind": "coarse_fine",
                "dataset": "fashion_mnist",
                "coarse_map": groups,
                "train_size": 20,
            },
        },
        "data",
    )
    ts = build_taskset(cfg, seed=0)
    coarse, fine = ts[0], ts[1]
    assert coarse.num_outputs == 2 and fine.num_outputs == 10
    assert coarse.train.labels.tolist() == [int(y) % 2 for y in fine.train.labels]
    assert coarse.test.labels.tolist() == [int(y) % 2 for y in yte]
    # one sample key: the same subsample and the same default val split (0.1 of 20) in both tasks
    assert torch.equal(coarse.train.images, fine.train.images) and len(coarse.train) == 18
    assert coarse.val is not None and fine.val is not None and torch.equal(coarse.val.images, fine.val.images)
    names = load_dataset_fashion(tmp_path).class_names
    assert coarse.class_names == ["+".join(names[0::2]), "+".join(names[1::2])]
    # any dataset, with no coarse labels of its own
    d = synth(k=6)
    t = coarse_fine(d, coarse_map={0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2})
    assert t[0].num_outputs == 3 and t[0].train.labels.tolist() == [int(y) // 2 for y in t[1].train.labels]
    with pytest.raises(ConfigError, match=r"^coarse_fine.coarse_map: does not cover class 5"):
        coarse_fine(d, coarse_map={c: 0 for c in range(5)})


def test_coarse_map_errors_name_the_key() -> None:
    sc = {"kind": "coarse_fine", "dataset": "mnist"}
    assert bad({"scenario": sc}).startswith(
        "run.yaml: data.scenario.coarse_map: mnist has no coarse labels of its own"
    )
    assert bad({"scenario": {**sc, "coarse_map": {c: c % 3 for c in range(9)}}}) == (
        "run.yaml: data.scenario.coarse_map: does not cover class 9 (selected classes: "
        "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])"
    )
    assert bad({"scenario": {**sc, "coarse_map": {c: 2 * (c % 2) for c in range(10)}}}) == (
        "run.yaml: data.scenario.coarse_map: new labels must be 0..m-1 with none unused, got [0, 2]"
    )
    assert bad(
        {"scenario": {"kind": "split_classes", "dataset": "mnist", "num_tasks": 2, "coarse_map": {0: 0}}}
    ) == ("run.yaml: data.scenario.coarse_map: not used by kind split_classes (used by: coarse_fine)")
    ok = validate(DataConfig, {"scenario": {**sc, "coarse_map": {c: int(c >= 5) for c in range(10)}}})
    assert ok.task_names() == ["mnist_coarse", "mnist_fine"]
