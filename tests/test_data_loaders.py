"""Dataset loaders on small files written by the tests themselves (never ../shared, never the network)."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from virtnet.data import (
    DATASETS,
    DataConfig,
    build_taskset,
    candidate_roots,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_folder,
    load_kmnist,
    load_kmnist10k,
    load_mnist,
    load_npz,
    load_synthetic,
    read_idx,
    resolve_data_root,
)
from virtnet.data.roots import ENV_VAR
from virtnet.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------------------------
# writers
# ------------------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x00000800 | arr.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_images(n: int, h: int = 3, w: int = 4, offset: int = 0) -> np.ndarray:
    """(n, h, w) uint8 images whose pixels are all distinct per image: image i starts at value i."""
    return ((np.arange(n * h * w).reshape(n, h, w) + offset) % 256).astype(np.uint8)


def write_idx_dataset(folder: Path, ntrain: int, ntest: int, gz_train: bool, gz_test: bool) -> dict:
    xtr, ytr = make_images(ntrain), (np.arange(ntrain) % 10).astype(np.uint8)
    xte, yte = make_images(ntest, offset=7), ((np.arange(ntest) * 3) % 10).astype(np.uint8)
    write_idx(folder / "train-images-idx3-ubyte", xtr, gz_train)
    write_idx(folder / "train-labels-idx1-ubyte", ytr, gz_train)
    write_idx(folder / "t10k-images-idx3-ubyte", xte, gz_test)
    write_idx(folder / "t10k-labels-idx1-ubyte", yte, gz_test)
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


# ------------------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    x = make_images(5)
    y = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    px = write_idx(tmp_path / "imgs", x, gz)
    py = write_idx(tmp_path / "labs", y, gz)
    rx, ry = read_idx(px, "images"), read_idx(py, "labels")
    assert rx.shape == (5, 3, 4) and rx.dtype == np.uint8
    assert np.array_equal(rx, x)
    assert ry.tolist() == [3, 1, 4, 1, 5]


def test_mnist_gz_and_raw_layouts(tmp_path: Path) -> None:
    ref = write_idx_dataset(tmp_path / "mnist", 20, 10, gz_train=True, gz_test=False)
    d = load_mnist(tmp_path)
    assert d.key == "mnist" and d.name == "MNIST"
    assert d.train.images.shape == (20, 1, 3, 4) and d.train.images.dtype == torch.uint8
    assert d.test.images.shape == (10, 1, 3, 4)
    assert torch.equal(d.train.images[:, 0], torch.from_numpy(ref["xtr"]))
    assert torch.equal(d.test.images[:, 0], torch.from_numpy(ref["xte"]))
    assert d.train.labels.dtype == torch.int64
    assert d.train.labels.tolist() == ref["ytr"].tolist()
    assert d.test.labels.tolist() == ref["yte"].tolist()
    assert d.class_names == [str(i) for i in range(10)]
    # unpacks as a (train, test, class_names) triple
    train, test, names = load_dataset("mnist", tmp_path)
    assert torch.equal(train.images, d.train.images) and len(test) == 10 and len(names) == 10


def test_fashion_mnist_torchvision_layout_and_coarse_labels(tmp_path: Path) -> None:
    ref = write_idx_dataset(tmp_path / "FashionMNIST" / "raw", 20, 10, gz_train=False, gz_test=True)
    d = load_fashion_mnist(tmp_path)
    assert d.name == "Fashion-MNIST"
    assert torch.equal(d.train.images[:, 0], torch.from_numpy(ref["xtr"]))
    group = {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 2, 7: 2, 9: 2, 8: 3}
    assert d.train_coarse is not None and d.test_coarse is not None
    assert d.train_coarse.tolist() == [group[int(c)] for c in ref["ytr"]]
    assert d.test_coarse.tolist() == [group[int(c)] for c in ref["yte"]]
    assert d.coarse().class_names == ["upper-body", "lower/full-body", "footwear", "bag"]


def test_missing_idx_file_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    write_idx_dataset(folder, 10, 10, gz_train=True, gz_test=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{folder / 't10k-labels-idx1-ubyte'}[.gz]: file not found")
    assert f"in {folder}" in msg and "train-images-idx3-ubyte[.gz]" in msg
    assert "\n" not in msg


def test_dataset_found_nowhere_lists_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path)
    msg = str(e.value)
    assert msg.startswith("mnist: dataset not found")
    for sub in ("mnist", "MNIST/raw"):
        assert str(tmp_path / sub) in msg


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_file(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(make_images(2))[:-5]  # 2 * 12 = 24 bytes of pixels expected, 19 kept
    p = tmp_path / ("imgs.gz" if gz else "imgs")
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as e:
        read_idx(p, "images")
    assert str(e.value) == f"{p}: truncated IDX file: expected 24 bytes of data, found 19"


def test_truncated_gzip_stream_names_file(tmp_path: Path) -> None:
    p = tmp_path / "imgs.gz"
    p.write_bytes(gzip.compress(idx_bytes(make_images(50)))[:-20])
    with pytest.raises(DataError, match=r"imgs\.gz: truncated gzip file"):
        read_idx(p)


def test_truncated_idx_in_dataset_names_file(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    write_idx_dataset(folder, 10, 10, gz_train=False, gz_test=False)
    f = folder / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(DataError, match=f"^{f}: truncated IDX file: expected 120 bytes of data, found 119$"):
        load_mnist(tmp_path)


def test_bad_magic_names_file_and_layout(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "labels", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(DataError) as e:
        read_idx(p, "images")
    assert str(e.value).startswith(f"{p}: bad IDX magic 0x00000801: expected images: magic 0x00000803")


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    write_idx_dataset(folder, 10, 10, gz_train=False, gz_test=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8), gz=False)
    with pytest.raises(DataError, match="9 labels for the 10 images"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------------------------------------------
# KMNIST
# ------------------------------------------------------------------------------------------------------


def test_kmnist_npz_layout(tmp_path: Path) -> None:
    folder = tmp_path / "kmnist"
    folder.mkdir()
    xtr, ytr = make_images(12), np.arange(12, dtype=np.uint8) % 10
    xte, yte = make_images(6, offset=99), np.array([9, 8, 7, 6, 5, 4], np.uint8)
    np.savez(folder / "kmnist-train-imgs.npz", xtr)
    np.savez(folder / "kmnist-train-labels.npz", ytr)
    np.savez(folder / "kmnist-test-imgs.npz", xte)
    np.savez(folder / "kmnist-test-labels.npz", yte)
    d = load_kmnist(tmp_path)
    assert d.name == "KMNIST"
    assert torch.equal(d.train.images[:, 0], torch.from_numpy(xtr))
    assert torch.equal(d.test.images[:, 0], torch.from_numpy(xte))
    assert d.test.labels.tolist() == [9, 8, 7, 6, 5, 4]
    assert d.class_names[:3] == ["o", "ki", "su"]


def test_kmnist_npz_missing_file_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "kmnist"
    folder.mkdir()
    for name in ("kmnist-train-imgs.npz", "kmnist-train-labels.npz", "kmnist-test-imgs.npz"):
        np.savez(folder / name, np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(DataError, match=f"^{folder / 'kmnist-test-labels.npz'}: file not found"):
        load_kmnist(tmp_path)


def test_kmnist_with_only_test_split_points_to_kmnist10k(tmp_path: Path) -> None:
    folder = tmp_path / "kmnist"
    write_idx(folder / "t10k-images-idx3-ubyte", make_images(10), gz=True)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8), gz=True)
    with pytest.raises(DataError) as e:
        load_kmnist(tmp_path)
    assert str(e.value).startswith(f"{folder / 'train-images-idx3-ubyte'}[.gz]: file not found")
    assert "kmnist10k" in str(e.value)


def write_fake_kmnist_test(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """100 images, 10 per class, image i has every pixel distinct from every other image's."""
    x = np.zeros((100, 4, 4), np.uint8)
    x[:, 0, 0] = np.arange(100)  # a unique first pixel per image
    x[:, 1:, :] = 7
    y = (np.arange(100) * 7 % 10).astype(np.uint8)  # 10 per class, interleaved
    write_idx(folder / "t10k-images-idx3-ubyte", x, gz=True)
    write_idx(folder / "t10k-labels-idx1-ubyte", y, gz=True)
    return x, y


def test_kmnist10k_split_is_fixed_stratified_and_disjoint(tmp_path: Path) -> None:
    from sklearn.model_selection import train_test_split

    x, y = write_fake_kmnist_test(tmp_path / "kmnist")
    d = load_kmnist10k(tmp_path)
    assert d.key == "kmnist10k" and d.name == "KMNIST-10k"
    assert len(d.train) == 80 and len(d.test) == 20
    assert torch.bincount(d.train.labels, minlength=10).tolist() == [8] * 10
    assert torch.bincount(d.test.labels, minlength=10).tolist() == [2] * 10
    tr_ids = d.train.images[:, 0, 0, 0].tolist()
    te_ids = d.test.images[:, 0, 0, 0].tolist()
    assert set(tr_ids).isdisjoint(te_ids) and sorted(tr_ids + te_ids) == list(range(100))
    # exactly scikit-learn's stratified split with seed 0, indices in file order
    tr, te = train_test_split(np.arange(100), test_size=0.2, random_state=0, stratify=y)
    assert tr_ids == sorted(tr.tolist()) and te_ids == sorted(te.tolist())
    assert d.train.labels.tolist() == y[np.sort(tr)].tolist()
    # the same split for any run seed
    cfg = DataConfig.model_validate(
        {"root": str(tmp_path), "val_fraction": 0, "tasks": [{"dataset": "kmnist10k"}]}
    )
    a, b = build_taskset(cfg, seed=0), build_taskset(cfg, seed=123)
    assert torch.equal(a[0].train.images, b[0].train.images)
    assert torch.equal(a[0].test.images, d.test.images)


# ------------------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------------------


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def dump(path: Path, obj: object, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(folder: Path) -> dict:
    ref: dict = {"train": [], "labels": []}
    for i in range(1, 6):
        rows = cifar_rows(2, i)
        labels = [i % 10, (i + 3) % 10]
        dump(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": rows, b"labels": labels})
        ref["train"].append(rows)
        ref["labels"] += labels
    ref["test"] = cifar_rows(3, 99)
    dump(folder / "test_batch", {b"data": ref["test"], b"labels": [7, 8, 9]}, protocol=5)
    names = [f"c{i}".encode() for i in range(10)]
    dump(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 2})
    return ref


def test_cifar10_pickle_layout(tmp_path: Path) -> None:
    ref = write_cifar10(tmp_path / "cifar-10-batches-py")
    d = load_cifar10(tmp_path)
    assert d.train.images.shape == (10, 3, 32, 32) and d.test.images.shape == (3, 3, 32, 32)
    rows = np.concatenate(ref["train"])
    # pixel (c, y, x) of image n is row n, column c * 1024 + y * 32 + x
    assert int(d.train.images[3, 2, 5, 7]) == int(rows[3, 2 * 1024 + 5 * 32 + 7])
    assert torch.equal(d.train.images.reshape(10, -1), torch.from_numpy(rows))
    assert torch.equal(d.test.images.reshape(3, -1), torch.from_numpy(ref["test"]))
    assert d.train.labels.tolist() == ref["labels"] and d.test.labels.tolist() == [7, 8, 9]
    assert d.class_names == [f"c{i}" for i in range(10)]


def test_cifar100_pickle_layout_fine_and_coarse(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    xtr, xte = cifar_rows(4, 1), cifar_rows(2, 2)
    dump(folder / "train", {"data": xtr, "fine_labels": [0, 99, 42, 5], "coarse_labels": [4, 19, 0, 3]})
    dump(folder / "test", {b"data": xte, b"fine_labels": [1, 2], b"coarse_labels": [5, 6]})
    meta = {
        b"fine_label_names": [f"f{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"g{i}".encode() for i in range(20)],
    }
    dump(folder / "meta", meta)
    d = load_cifar100(tmp_path)
    assert torch.equal(d.train.images.reshape(4, -1), torch.from_numpy(xtr))
    assert d.train.labels.tolist() == [0, 99, 42, 5] and d.test.labels.tolist() == [1, 2]
    assert d.train_coarse is not None and d.train_coarse.tolist() == [4, 19, 0, 3]
    assert d.test_coarse is not None and d.test_coarse.tolist() == [5, 6]
    c = d.coarse()
    assert (
        c.train.labels.tolist() == [4, 19, 0, 3] and c.class_names[19] == "g19" and len(c.class_names) == 20
    )
    assert torch.equal(c.train.images, d.train.images)


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_restricted_unpickler_refuses_other_globals(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    dump(folder / "test_batch", {b"data": cifar_rows(1, 0), b"labels": [_Evil()]})
    pattern = f"^{folder / 'test_batch'}: refusing to unpickle '(posix|nt).getcwd': only numpy arrays"
    with pytest.raises(DataError, match=pattern):
        load_cifar10(tmp_path)


def test_cifar_bad_data_shape_names_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    dump(folder / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=f"^{folder / 'data_batch_3'}: 'data' must be \\(N, 3072\\) uint8"):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------------------------------
# class folders
# ------------------------------------------------------------------------------------------------------


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_layout_grayscale(tmp_path: Path) -> None:
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    save_png(tmp_path / "train" / "zebra" / "a.png", g)
    save_png(tmp_path / "train" / "apple" / "b.png", g + 100)
    save_png(tmp_path / "train" / "apple" / "a.bmp", g + 50)
    save_png(tmp_path / "test" / "zebra" / "x.png", g + 200)
    (tmp_path / "train" / "apple" / "notes.txt").write_text("ignored")
    d = load_folder(tmp_path, channels=1)
    assert d.class_names == ["apple", "zebra"]
    # classes sorted by name, files sorted by name: apple/a.bmp, apple/b.png, zebra/a.png
    assert d.train.labels.tolist() == [0, 0, 1]
    assert d.train.images.shape == (3, 1, 3, 4)
    assert torch.equal(d.train.images[:, 0], torch.from_numpy(np.stack([g + 50, g + 100, g])))
    assert d.test.labels.tolist() == [1] and torch.equal(d.test.images[0, 0], torch.from_numpy(g + 200))


def test_folder_layout_rgb_and_resize(tmp_path: Path) -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 5
    save_png(tmp_path / "train" / "a" / "0.png", rgb)
    save_png(tmp_path / "test" / "a" / "0.png", rgb)
    d = load_folder(tmp_path, channels=3)
    assert d.train.images.shape == (1, 3, 2, 3)
    assert torch.equal(d.train.images[0], torch.from_numpy(rgb.transpose(2, 0, 1)))
    big = np.full((6, 6), 80, np.uint8)
    save_png(tmp_path / "sized" / "train" / "a" / "0.png", big)
    save_png(tmp_path / "sized" / "test" / "a" / "0.png", big[:4])
    r = load_folder(tmp_path / "sized", image_size=[2, 3])
    assert r.train.images.shape == (1, 1, 2, 3) and r.test.images.shape == (1, 1, 2, 3)
    assert int(r.train.images.min()) == 80 and int(r.train.images.max()) == 80


def test_folder_wrong_channels_names_file(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    bad = tmp_path / "train" / "b" / "1.png"
    save_png(bad, np.zeros((4, 4, 3), np.uint8))
    save_png(tmp_path / "test" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, channels=1)
    assert str(e.value).startswith(f"{bad}: expected 1 channel")
    assert "found 3" in str(e.value)
    # without `channels`, every image must have the channels of the first one
    with pytest.raises(DataError, match=f"^{bad}: expected 1 channel .*found 3"):
        load_folder(tmp_path)


def test_folder_wrong_channels_via_config_names_file(tmp_path: Path) -> None:
    save_png(tmp_path / "imgs" / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    bad = tmp_path / "imgs" / "test" / "a" / "0.png"
    save_png(bad, np.zeros((4, 4), np.uint8))
    cfg = DataConfig.model_validate(
        {
            "tasks": [
                {
                    "name": "pics",
                    "dataset": "folder",
                    "root": str(tmp_path / "imgs"),
                    "options": {"channels": 3},
                }
            ]
        }
    )
    with pytest.raises(DataError, match=f"^{bad}: expected 3 channels .*found 1"):
        build_taskset(cfg, 0)


def test_folder_odd_size_names_file(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    odd = tmp_path / "train" / "a" / "1.png"
    save_png(odd, np.zeros((4, 5), np.uint8))
    save_png(tmp_path / "test" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=f"^{odd}: image size 4x5 \\(HxW\\) differs from 4x4"):
        load_folder(tmp_path)


def test_folder_missing_test_dir(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=f"^{tmp_path / 'test'}: folder not found"):
        load_folder(tmp_path)


# ------------------------------------------------------------------------------------------------------
# generic npz, digits, synthetic
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    c = 1 if layout == "nhw" else 3
    x = np.arange(4 * c * 5 * 6, dtype=np.uint8).reshape(4, c, 5, 6)  # reference (N, C, H, W)
    stored = {"nhw": x[:, 0], "nhwc": x.transpose(0, 2, 3, 1), "nchw": x}[layout]
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", images=stored, labels=np.array([0, 1, 2, 1]))
    d = load_npz(tmp_path)
    assert torch.equal(d.train.images, torch.from_numpy(x))
    assert d.train.labels.tolist() == [0, 1, 2, 1] and d.class_names == ["0", "1", "2"]


def test_npz_wrong_dtype_names_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "train.npz", images=np.zeros((2, 4, 4), np.float32), labels=np.array([0, 1]))
    np.savez(tmp_path / "test.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=f"^{tmp_path / 'train.npz'}: 'images' must be uint8, got float32"):
        load_npz(tmp_path)


def test_digits() -> None:
    from sklearn.datasets import load_digits as sk
    from sklearn.model_selection import train_test_split

    d = load_digits()
    assert len(d.train) == 1437 and len(d.test) == 360
    assert d.train.images.shape == (1437, 1, 8, 8) and d.train.images.dtype == torch.uint8
    raw = sk()
    tr, _ = train_test_split(np.arange(1797), test_size=0.2, random_state=0, stratify=raw.target)
    first = int(np.sort(tr)[0])
    expect = np.round(raw.images[first] * 255 / 16).astype(np.uint8)
    assert torch.equal(d.train.images[0, 0], torch.from_numpy(expect))
    assert int(d.train.labels[0]) == int(raw.target[first])
    assert set(np.unique(d.train.images.numpy()).tolist()) <= {round(v * 255 / 16) for v in range(17)} | {128}


def test_synthetic_is_deterministic_and_duplicate_free() -> None:
    a = load_synthetic(num_classes=3, channels=3, size=6, num_train=30, num_test=12, seed=4)
    b = load_synthetic(num_classes=3, channels=3, size=6, num_train=30, num_test=12, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert a.train.images.shape == (30, 3, 6, 6)
    assert a.train.labels.tolist() == [i % 3 for i in range(30)]
    rows = {bytes(img.numpy().tobytes()) for img in torch.cat([a.train.images, a.test.images])}
    assert len(rows) == 42
    c = load_synthetic(num_classes=3, channels=3, size=6, num_train=30, num_test=12, seed=5)
    assert not torch.equal(a.train.images, c.train.images)
    with pytest.raises(ConfigError, match="channels must be 1 or 3, got 2"):
        load_synthetic(channels=2)


def test_registry_names() -> None:
    assert set(DATASETS) == {
        "digits",
        "mnist",
        "fashion_mnist",
        "kmnist",
        "kmnist10k",
        "cifar10",
        "cifar100",
        "folder",
        "npz",
        "synthetic",
    }
    with pytest.raises(ConfigError, match=r"unknown dataset 'svhn' \(known: cifar10, cifar100, digits"):
        load_dataset("svhn")


# ------------------------------------------------------------------------------------------------------
# roots
# ------------------------------------------------------------------------------------------------------


def test_roots_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert candidate_roots(explicit) == [explicit]
    assert resolve_data_root(explicit) == explicit
    assert candidate_roots() == [tmp_path / "env"]
    with pytest.raises(DataError, match="data root not found"):
        resolve_data_root()
    monkeypatch.delenv(ENV_VAR)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(work)
    cands = candidate_roots()
    assert cands[0] == tmp_path / "shared" / "data" and cands[-1] == Path("/usr/share/datasets")
    assert resolve_data_root() == tmp_path / "shared" / "data"
    with pytest.raises(DataError, match="given explicitly"):
        resolve_data_root(tmp_path / "nope")


def test_env_root_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = write_idx_dataset(tmp_path / "MNIST" / "raw", 10, 10, gz_train=True, gz_test=True)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    d = load_mnist()
    assert d.train.labels.tolist() == ref["ytr"].tolist()
