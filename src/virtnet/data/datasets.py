"""Dataset loaders: files on disk -> a train/test pair of in-memory :class:`ArrayDataset`.

Every loader returns a :class:`DatasetSplits` (train and test ``ArrayDataset`` with images ``(N, C, H, W)``
uint8 and labels ``(N,)`` int64, plus class names), which also unpacks as
``train, test, class_names = load_mnist(root)``. Loaders never download: they search the candidate data
roots of :mod:`virtnet.data.roots` and raise a one-line :class:`DataError` naming the file when something
is missing, truncated or malformed.

Layouts read:

- scikit-learn's bundled ``digits`` (no file);
- MNIST, Fashion-MNIST and KMNIST as IDX files (gzip or raw), KMNIST also as ``.npz``;
- ``kmnist10k``: KMNIST's official test split alone, split 8,000/2,000 with a fixed seed;
- CIFAR-10 / CIFAR-100 in the python-pickle layout (read with a restricted unpickler);
- a class-per-folder image layout (``train/<class>/*.png``) and a generic ``train.npz``/``test.npz``;
- ``synthetic``: a small deterministic learnable dataset for tests.

:data:`DATASETS` maps each registered name to its loader; :func:`load_dataset` calls it by name.
"""

from __future__ import annotations

import builtins
import gzip
import inspect
import pickle
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from virtnet.data.core import ArrayDataset
from virtnet.data.roots import candidate_roots
from virtnet.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------------------
# The loaded form of a dataset
# --------------------------------------------------------------------------------------------------------


@dataclass
class DatasetSplits:
    """A dataset's train and test splits as loaded from disk.

    Attributes:
        key: the registry name (``mnist``, ``kmnist10k``...).
        name: the display name (``MNIST``, ``KMNIST-10k``...).
        train: training images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64.
        test: test images and labels, same layout.
        class_names: one name per (fine) class.
        train_coarse: ``(N_train,)`` int64 coarse labels (CIFAR-100's 20 superclasses, the documented
            Fashion-MNIST grouping), else None.
        test_coarse: ``(N_test,)`` int64 coarse labels, else None.
        coarse_class_names: one name per coarse class, else None.
    """

    key: str
    name: str
    train: ArrayDataset
    test: ArrayDataset
    class_names: list[str]
    train_coarse: torch.Tensor | None = None
    test_coarse: torch.Tensor | None = None
    coarse_class_names: list[str] | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.test, self.class_names))

    @property
    def num_classes(self) -> int:
        """Number of (fine) classes."""
        return len(self.class_names)

    @property
    def has_coarse(self) -> bool:
        """Whether coarse labels are available."""
        return self.train_coarse is not None and self.test_coarse is not None

    def coarse(self) -> DatasetSplits:
        """The same images with the coarse labels as labels.

        Raises:
            DataError: the dataset has no coarse labels.
        """
        if not self.has_coarse or self.coarse_class_names is None:
            raise DataError(f"{self.key}: no coarse labels (available for cifar100 and fashion_mnist)")
        assert self.train_coarse is not None and self.test_coarse is not None
        return replace(
            self,
            train=ArrayDataset(self.train.images, self.train_coarse, None, self.train.source),
            test=ArrayDataset(self.test.images, self.test_coarse, None, self.test.source),
            class_names=list(self.coarse_class_names),
            train_coarse=None,
            test_coarse=None,
            coarse_class_names=None,
        )


def _to_dataset(images: np.ndarray, labels: np.ndarray, source: str) -> ArrayDataset:
    """``images`` (N, C, H, W) uint8 and integer ``labels`` (N,) -> ArrayDataset (copies)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8).copy())  # (N, C, H, W)
    y = torch.from_numpy(np.asarray(labels).astype(np.int64, copy=True))  # (N,)
    return ArrayDataset(x, y, None, source)


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DataError(f"{source}: label {bad} out of range: expected 0..{num_classes - 1}")


def _opt_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _stratified_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified (train, test) index split with scikit-learn, each sorted ascending."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    try:
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as e:
        msg = f"cannot split {len(labels)} images stratified with test_fraction {test_fraction}: {e}"
        raise DataError(msg) from None
    return np.sort(tr), np.sort(te)


# --------------------------------------------------------------------------------------------------------
# Searching for files
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """A set of files that together hold a dataset, e.g. the four MNIST IDX files."""

    name: str
    files: tuple[str, ...]  # file names (without the optional suffixes)
    suffixes: tuple[str, ...] = ("",)  # alternatives tried in order, e.g. ("", ".gz")
    hint: str = ""  # appended to the missing-file error

    def find(self, folder: Path, name: str) -> Path | None:
        for s in self.suffixes:
            p = folder / (name + s)
            if p.is_file():
                return p
        return None

    def describe(self) -> str:
        opt = "".join(f"[{s}]" for s in self.suffixes if s)
        return ", ".join(f + opt for f in self.files)


def _search_folders(root: str | Path | None, subdirs: Sequence[str]) -> list[Path]:
    folders: list[Path] = []
    for r in candidate_roots(root):
        for s in subdirs:
            f = r / s if s else r
            if f not in folders:
                folders.append(f)
    return folders


def _locate(
    key: str, root: str | Path | None, subdirs: Sequence[str], layouts: Sequence[_Layout]
) -> tuple[_Layout, Path, dict[str, Path]]:
    """The first folder (in candidate order) holding any file of one of ``layouts``.

    Every file of that layout must then be in that folder: a partial copy is an error naming the missing
    file rather than a silent fall-through to another root.
    """
    folders = _search_folders(root, subdirs)
    for folder in folders:
        if not folder.is_dir():
            continue
        for layout in layouts:
            found = {f: layout.find(folder, f) for f in layout.files}
            if any(p is not None for p in found.values()):
                missing = [f for f, p in found.items() if p is None]
                if missing:
                    opt = "".join(f"[{s}]" for s in layout.suffixes if s)
                    raise DataError(
                        f"{folder / missing[0]}{opt}: file not found: the {layout.name} layout expects "
                        f"{layout.describe()} in {folder}{layout.hint}"
                    )
                return layout, folder, {f: p for f, p in found.items() if p is not None}
    what = " or ".join(f"{lay.name} ({lay.describe()})" for lay in layouts)
    raise DataError(
        f"{key}: dataset not found: looked for {what} in {', '.join(map(str, folders))} "
        f"(set data.root, --data-root or VIRTNET_DATA_ROOT)"
    )


def _resolve_path(root: str | Path | None, path: str | Path | None, key: str, expect: str) -> Path:
    """The folder/file of a user dataset: ``path`` (absolute, or relative to a candidate root) or ``root``."""
    if path is None:
        if root is None:
            raise ConfigError(f"{key} dataset needs options.path or a root pointing at {expect}")
        p = Path(root).expanduser()
        if not p.exists():
            raise DataError(f"{p}: not found: the {key} layout expects {expect} there")
        return p
    p = Path(path).expanduser()
    if p.is_absolute():
        if not p.exists():
            raise DataError(f"{p}: not found: the {key} layout expects {expect} there")
        return p
    looked = [r / p for r in candidate_roots(root)]
    for cand in looked:
        if cand.exists():
            return cand
    raise DataError(f"{p}: not found: looked in {', '.join(map(str, looked))} for {expect}")


# --------------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.2, seed: int = 0, root: str | Path | None = None) -> DatasetSplits:
    """scikit-learn's bundled handwritten digits (1,797 images, 8x8, 10 classes), no file needed.

    Pixels 0..16 become uint8 ``round(v * 255 / 16)`` (numpy rounding: 8 -> 128, 16 -> 255). The split
    is scikit-learn's ``train_test_split(stratify=labels, random_state=seed)``; indices are kept in their
    original order within each split. The default (0.2, seed 0) gives 1,437 train / 360 test images.

    Args:
        test_fraction: fraction of the images in the test split, in (0, 1).
        seed: split seed (fixed by default so every run uses the same split).
        root: ignored (digits need no file); accepted so every loader takes ``root``.

    Returns:
        The train/test splits with images ``(N, 1, 8, 8)``.
    """
    del root
    if not isinstance(test_fraction, int | float) or not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    _opt_int("seed", seed, 0)
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)  # (1797,)
    tr, te = _stratified_indices(y, float(test_fraction), seed)
    src = "sklearn digits"
    return DatasetSplits(
        "digits",
        "Digits",
        _to_dataset(x[tr], y[tr], f"{src} (train split)"),
        _to_dataset(x[te], y[te], f"{src} (test split)"),
        [str(i) for i in range(10)],
    )


# --------------------------------------------------------------------------------------------------------
# IDX (MNIST family)
# --------------------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_IDX_LAYOUT = {
    IDX_IMAGES_MAGIC: "images: magic 0x00000803, then count, rows, cols (big-endian uint32), uint8 pixels",
    IDX_LABELS_MAGIC: "labels: magic 0x00000801, then count as big-endian uint32, then uint8 labels",
}


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"{path}: truncated gzip file: the compressed stream ends early") from None
    except (OSError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file: {e}") from None


def read_idx(path: str | Path, kind: str | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed, detected from its content) into a uint8 array.

    Args:
        path: the file.
        kind: ``"images"`` (magic 0x00000803, 3 dims), ``"labels"`` (magic 0x00000801, 1 dim) or None
            for either.

    Returns:
        ``(count, rows, cols)`` for images or ``(count,)`` for labels, uint8 (read-only view).

    Raises:
        DataError: the file is missing, has a bad magic, bad dims, or is truncated or too long; the
            message names the file.
    """
    path = Path(path)
    if kind not in (None, "images", "labels"):
        raise ValueError(f"kind must be 'images', 'labels' or None, got {kind!r}")
    data = _read_maybe_gzip(path)
    allowed = {"images": (IDX_IMAGES_MAGIC,), "labels": (IDX_LABELS_MAGIC,), None: tuple(_IDX_LAYOUT)}[kind]
    expect = " or ".join(_IDX_LAYOUT[m] for m in allowed)
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated IDX file: {len(data)} bytes, expected at least a 4-byte magic ({expect})"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic not in allowed:
        raise DataError(f"{path}: bad IDX magic 0x{magic:08x}: expected {expect}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX file: expected a {header}-byte header, found {len(data)} bytes"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if any(d == 0 for d in dims[1:]):
        raise DataError(f"{path}: bad IDX dims {dims}: rows and cols must be positive ({expect})")
    n = int(np.prod(dims, dtype=np.int64))
    found = len(data) - header
    if found < n:
        raise DataError(f"{path}: truncated IDX file: expected {n} bytes of data, found {found}")
    if found > n:
        raise DataError(
            f"{path}: IDX file too long: expected {n} bytes of data after the header, found {found}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=n, offset=header).reshape(dims)


_IDX_SUFFIXES = ("", ".gz")
_IDX_TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_split(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, "images")  # (N, H, W)
    y = read_idx(labels, "labels")  # (N,)
    if len(x) != len(y):
        raise DataError(f"{labels}: {len(y)} labels for the {len(x)} images of {images.name}")
    _check_labels(y, num_classes, str(labels))
    return x[:, None], y  # (N, 1, H, W), (N,)


def _npz_array(path: Path, key: str = "arr_0") -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(f"{path}: no array '{key}' (found {sorted(z.files)})")
            return z[key]
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{path}: cannot read npz without pickle: {e}") from None
    except (OSError, zlib.error, EOFError, KeyError) as e:
        raise DataError(f"{path}: not a valid .npz file: {e}") from None


def _npz_split(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = _npz_array(images)
    y = _npz_array(labels)
    if x.dtype != np.uint8 or x.ndim != 3:
        raise DataError(f"{images}: expected 'arr_0' of shape (N, 28, 28) uint8, got {x.shape} {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{labels}: expected 'arr_0' of shape (N,) integers, got {y.shape} {y.dtype}")
    if len(x) != len(y):
        raise DataError(f"{labels}: {len(y)} labels for the {len(x)} images of {images.name}")
    _check_labels(y, num_classes, str(labels))
    return x[:, None], y


MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]

#: The coarse grouping of Fashion-MNIST (documented in docs/data.md): source class -> coarse class.
FASHION_MNIST_COARSE: dict[int, int] = {0: 0, 2: 0, 4: 0, 6: 0, 1: 1, 3: 1, 5: 2, 7: 2, 9: 2, 8: 3}
FASHION_MNIST_COARSE_CLASSES = ["upper-body", "lower/full-body", "footwear", "bag"]

_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST", ""),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", ""),
    "kmnist": ("kmnist", "KMNIST/raw", "KMNIST", ""),
}


def _load_idx_family(key: str, name: str, root: str | Path | None, classes: list[str]) -> DatasetSplits:
    layouts = [_Layout(f"{name} IDX", _IDX_TRAIN + _IDX_TEST, _IDX_SUFFIXES)]
    if key == "kmnist":
        hint = " (only the test split is there? use kmnist10k)"
        idx = _Layout(f"{name} IDX", _IDX_TRAIN + _IDX_TEST, _IDX_SUFFIXES, hint)
        npz = _Layout(
            "KMNIST npz",
            (
                "kmnist-train-imgs.npz",
                "kmnist-train-labels.npz",
                "kmnist-test-imgs.npz",
                "kmnist-test-labels.npz",
            ),
            ("",),
            hint,
        )
        layouts = [idx, npz]
    layout, _, files = _locate(key, root, _SUBDIRS[key], layouts)
    n = len(classes)
    if layout.name.endswith("npz"):
        xtr, ytr = _npz_split(files["kmnist-train-imgs.npz"], files["kmnist-train-labels.npz"], n)
        xte, yte = _npz_split(files["kmnist-test-imgs.npz"], files["kmnist-test-labels.npz"], n)
        src_tr, src_te = files["kmnist-train-imgs.npz"], files["kmnist-test-imgs.npz"]
    else:
        xtr, ytr = _idx_split(files[_IDX_TRAIN[0]], files[_IDX_TRAIN[1]], n)
        xte, yte = _idx_split(files[_IDX_TEST[0]], files[_IDX_TEST[1]], n)
        src_tr, src_te = files[_IDX_TRAIN[0]], files[_IDX_TEST[0]]
    return DatasetSplits(
        key, name, _to_dataset(xtr, ytr, str(src_tr)), _to_dataset(xte, yte, str(src_te)), classes
    )


def load_mnist(root: str | Path | None = None) -> DatasetSplits:
    """MNIST (60,000 train / 10,000 test, 28x28 grayscale) from the four IDX files (gzip or raw).

    Searched in ``mnist/``, ``MNIST/raw/``, ``MNIST/`` and the root itself, under each candidate root.
    """
    return _load_idx_family("mnist", "MNIST", root, MNIST_CLASSES)


def load_fashion_mnist(root: str | Path | None = None) -> DatasetSplits:
    """Fashion-MNIST (60,000 / 10,000, 28x28 grayscale) from the four IDX files (gzip or raw).

    Searched in ``fashion-mnist/``, ``fashion_mnist/``, ``FashionMNIST/raw/``, ``FashionMNIST/`` and the
    root itself, under each candidate root (which include Debian's ``/usr/share/datasets``). Coarse labels
    follow :data:`FASHION_MNIST_COARSE` (upper-body, lower/full-body, footwear, bag).
    """
    d = _load_idx_family("fashion_mnist", "Fashion-MNIST", root, FASHION_MNIST_CLASSES)
    lut = torch.tensor([FASHION_MNIST_COARSE[c] for c in range(10)], dtype=torch.long)
    d.train_coarse = lut[d.train.labels]  # (N_train,)
    d.test_coarse = lut[d.test.labels]  # (N_test,)
    d.coarse_class_names = list(FASHION_MNIST_COARSE_CLASSES)
    return d


def load_kmnist(root: str | Path | None = None) -> DatasetSplits:
    """Kuzushiji-MNIST, full official split (60,000 / 10,000), from IDX files or the ``.npz`` layout.

    The ``.npz`` layout is ``kmnist-{train,test}-{imgs,labels}.npz``, each with its array under
    ``arr_0`` (read without pickle). Searched in ``kmnist/``, ``KMNIST/raw/``, ``KMNIST/`` and the root.
    When only the test split exists, use :func:`load_kmnist10k`.
    """
    return _load_idx_family("kmnist", "KMNIST", root, KMNIST_CLASSES)


KMNIST10K_SPLIT_SEED = 0
KMNIST10K_TEST_FRACTION = 0.2


def load_kmnist10k(root: str | Path | None = None) -> DatasetSplits:
    """KMNIST-10k: KMNIST's official TEST split (10,000 images) split into 8,000 train / 2,000 test.

    Only KMNIST's test files (``t10k-*-idx*-ubyte[.gz]`` or ``kmnist-test-*.npz``) are read. The split is
    scikit-learn's ``train_test_split(test_size=0.2, stratify=labels, random_state=0)`` with the FIXED
    seed 0, independent of the run seed, so every result uses the same split (800 / 200 images of each
    class on the official file; indices kept in file order). Results on it must be called KMNIST-10k,
    never KMNIST.
    """
    idx = _Layout("KMNIST test IDX", _IDX_TEST, _IDX_SUFFIXES)
    npz = _Layout("KMNIST test npz", ("kmnist-test-imgs.npz", "kmnist-test-labels.npz"))
    layout, _, files = _locate("kmnist10k", root, _SUBDIRS["kmnist"], [idx, npz])
    if layout is npz:
        src = files["kmnist-test-imgs.npz"]
        x, y = _npz_split(src, files["kmnist-test-labels.npz"], 10)
    else:
        src = files[_IDX_TEST[0]]
        x, y = _idx_split(src, files[_IDX_TEST[1]], 10)
    tr, te = _stratified_indices(y, KMNIST10K_TEST_FRACTION, KMNIST10K_SPLIT_SEED)
    return DatasetSplits(
        "kmnist10k",
        "KMNIST-10k",
        _to_dataset(x[tr], y[tr], f"{src} (KMNIST-10k train split)"),
        _to_dataset(x[te], y[te], f"{src} (KMNIST-10k test split)"),
        list(KMNIST_CLASSES),
    )


# --------------------------------------------------------------------------------------------------------
# CIFAR (python pickle layout)
# --------------------------------------------------------------------------------------------------------


class _Refused(Exception):
    pass


def _numpy_core() -> Any:
    return getattr(np, "_core", None) or np.core


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays, dtypes and builtin containers.

    Allowed globals: numpy's array reconstruction (``multiarray._reconstruct``, ``numeric._frombuffer``,
    ``multiarray.scalar``, under ``numpy.core`` or ``numpy._core``), ``numpy.ndarray``, ``numpy.dtype``,
    ``_codecs.encode`` (how Python 3 pickles ``bytes`` at protocol 2) and the builtin container and number
    types. Anything else raises instead of importing it, so a crafted file cannot run code.
    """

    _NUMPY = {
        ("multiarray", "_reconstruct"),
        ("multiarray", "scalar"),
        ("numeric", "_frombuffer"),
    }
    _BUILTINS = {
        "list",
        "dict",
        "tuple",
        "set",
        "frozenset",
        "bytes",
        "bytearray",
        "str",
        "int",
        "float",
        "complex",
        "bool",
    }

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return getattr(builtins, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            import codecs

            return codecs.encode
        for prefix in ("numpy.core.", "numpy._core."):
            if module.startswith(prefix) and (module[len(prefix) :], name) in self._NUMPY:
                return getattr(getattr(_numpy_core(), module[len(prefix) :]), name)
        raise _Refused(f"{module}.{name}")


def unpickle_restricted(path: str | Path) -> Any:
    """Load a pickle file with :class:`RestrictedUnpickler` (``encoding='bytes'``, as CIFAR needs).

    Raises:
        DataError: the file is missing, not a pickle, or references anything but numpy arrays and
            builtins; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise DataError(
            f"{path}: refusing to unpickle '{e}': only numpy arrays, dtypes and builtin types are allowed"
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as e:
        raise DataError(f"{path}: not a valid pickle file: {type(e).__name__}: {e}") from None


def _get(d: Any, key: str, path: Path, expect: str) -> Any:
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict ({expect}), got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing key '{key}' (expected {expect})")


def _names(values: Any, path: Path, key: str) -> list[str]:
    if not isinstance(values, list | tuple):
        raise DataError(f"{path}: '{key}' must be a list of names, got {type(values).__name__}")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


_CIFAR_EXPECT = "'data' (N, 3072) uint8 rows of 3x32x32 pixels and '{labels}' (N,)"


def _cifar_batch(
    path: Path, label_keys: Sequence[str], num_classes: Sequence[int]
) -> tuple[np.ndarray, list]:
    expect = _CIFAR_EXPECT.format(labels="', '".join(label_keys))
    d = unpickle_restricted(path)
    data = _get(d, "data", path, expect)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be (N, 3072) uint8, got {shape} {getattr(data, 'dtype', '')}")
    labels = []
    for key, n in zip(label_keys, num_classes, strict=True):
        y = np.asarray(_get(d, key, path, expect))
        if y.ndim != 1 or len(y) != len(data) or (y.size and not np.issubdtype(y.dtype, np.integer)):
            raise DataError(f"{path}: '{key}' must hold {len(data)} integer labels, got shape {y.shape}")
        _check_labels(y, n, f"{path}: '{key}'")
        labels.append(y)
    return data.reshape(-1, 3, 32, 32), labels  # (N, 3, 32, 32)


_CIFAR10_SUBDIRS = (
    "cifar-10-batches-py",
    "cifar10/cifar-10-batches-py",
    "CIFAR10/cifar-10-batches-py",
    "cifar10",
    "cifar-10",
    "",
)
_CIFAR100_SUBDIRS = (
    "cifar-100-python",
    "cifar100/cifar-100-python",
    "CIFAR100/cifar-100-python",
    "cifar100",
    "cifar-100",
    "",
)


def load_cifar10(root: str | Path | None = None) -> DatasetSplits:
    """CIFAR-10 (50,000 / 10,000, 32x32 RGB) in the python-pickle layout.

    Files ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta`` in
    ``cifar-10-batches-py/`` (or ``cifar10/``, ``cifar-10/``, the root itself), read with
    :class:`RestrictedUnpickler`; bytes keys (``b'data'``) and str keys are both accepted.
    """
    batches = tuple(f"data_batch_{i}" for i in range(1, 6))
    layout = _Layout("CIFAR-10 python", (*batches, "test_batch", "batches.meta"))
    _, _, files = _locate("cifar10", root, _CIFAR10_SUBDIRS, [layout])
    meta = files["batches.meta"]
    names = _names(_get(unpickle_restricted(meta), "label_names", meta, "'label_names'"), meta, "label_names")
    if len(names) != 10:
        raise DataError(f"{meta}: expected 10 label_names, found {len(names)}")
    parts = [_cifar_batch(files[b], ["labels"], [10]) for b in batches]
    xtr = np.concatenate([p[0] for p in parts])  # (50000, 3, 32, 32)
    ytr = np.concatenate([p[1][0] for p in parts])
    xte, (yte,) = _cifar_batch(files["test_batch"], ["labels"], [10])
    folder = files["test_batch"].parent
    return DatasetSplits(
        "cifar10",
        "CIFAR-10",
        _to_dataset(xtr, ytr, str(folder / "data_batch_*")),
        _to_dataset(xte, yte, str(files["test_batch"])),
        names,
    )


def load_cifar100(root: str | Path | None = None) -> DatasetSplits:
    """CIFAR-100 (50,000 / 10,000, 32x32 RGB) in the python-pickle layout, fine and coarse labels.

    Files ``train``, ``test`` and ``meta`` in ``cifar-100-python/`` (or ``cifar100/``, ``cifar-100/``, the
    root itself). ``labels`` are the 100 fine classes; ``train_coarse``/``test_coarse`` the 20
    superclasses (``DatasetSplits.coarse()`` swaps them in).
    """
    layout = _Layout("CIFAR-100 python", ("train", "test", "meta"))
    _, _, files = _locate("cifar100", root, _CIFAR100_SUBDIRS, [layout])
    meta = files["meta"]
    m = unpickle_restricted(meta)
    expect = "'fine_label_names' and 'coarse_label_names'"
    fine = _names(_get(m, "fine_label_names", meta, expect), meta, "fine_label_names")
    coarse = _names(_get(m, "coarse_label_names", meta, expect), meta, "coarse_label_names")
    if len(fine) != 100 or len(coarse) != 20:
        raise DataError(
            f"{meta}: expected 100 fine and 20 coarse label names, found {len(fine)} and {len(coarse)}"
        )
    keys = ["fine_labels", "coarse_labels"]
    xtr, (ytr, ctr) = _cifar_batch(files["train"], keys, [100, 20])
    xte, (yte, cte) = _cifar_batch(files["test"], keys, [100, 20])
    return DatasetSplits(
        "cifar100",
        "CIFAR-100",
        _to_dataset(xtr, ytr, str(files["train"])),
        _to_dataset(xte, yte, str(files["test"])),
        fine,
        torch.from_numpy(ctr.astype(np.int64)),
        torch.from_numpy(cte.astype(np.int64)),
        coarse,
    )


# --------------------------------------------------------------------------------------------------------
# Class-per-folder images
# --------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# 8-bit modes: 1 and 3 channels are read; LA and RGBA (2 and 4 channels) are reported as channel mismatches
_IMAGE_MODES = ("1", "L", "LA", "RGB", "RGBA")
_FOLDER_EXPECT = "train/<class>/*.png|jpg|jpeg|bmp and test/<class>/..."


def _image_size_opt(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return image_size, image_size
    if (
        isinstance(image_size, list | tuple)
        and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        return int(image_size[0]), int(image_size[1])
    raise ConfigError(f"image_size must be a positive int or [height, width], got {image_size!r}")


class _FolderReader:
    """Reads images one by one, checking channels and size against the options or the first image."""

    def __init__(self, channels: int | None, size: tuple[int, int] | None) -> None:
        self.channels = channels
        self.size = size  # (H, W) to resize to
        self.first: tuple[Path, int, tuple[int, int]] | None = None  # file, channels, (H, W)

    def read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                if img.mode in ("P", "PA"):
                    transparent = img.mode == "PA" or "transparency" in img.info
                    img = img.convert("RGBA" if transparent else "RGB")
                if img.mode not in _IMAGE_MODES:
                    raise DataError(
                        f"{path}: unsupported image mode {img.mode}: expected 8-bit grayscale (L) or RGB"
                    )
                c = len(img.getbands())
                want = self.channels if self.channels is not None else (self.first[1] if self.first else None)
                if want is None and c not in (1, 3):
                    raise DataError(f"{path}: {c} channels (mode {img.mode}): expected 1 (L) or 3 (RGB)")
                if want is not None and c != want:
                    what = "set by options.channels" if self.channels is not None else f"as {self.first[0]}"
                    raise DataError(
                        f"{path}: expected {want} channel{'s' if want > 1 else ''} ({what}), "
                        f"found {c} (mode {img.mode})"
                    )
                img = img.convert("L" if c == 1 else "RGB")
                hw = (img.height, img.width)
                if self.size is not None:
                    if hw != self.size:
                        img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                elif self.first is not None and hw != self.first[2]:
                    h0, w0 = self.first[2]
                    raise DataError(
                        f"{path}: image size {hw[0]}x{hw[1]} (HxW) differs from {h0}x{w0} of {self.first[0]} "
                        f"(set options.image_size to resize)"
                    )
                if self.first is None:
                    self.first = (path, c, hw)
                arr = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: cannot read image: {e}") from None
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def _read_class_dirs(
    split_dir: Path, classes: list[str], reader: _FolderReader
) -> tuple[np.ndarray, np.ndarray]:
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for ci, cname in enumerate(classes):
        cdir = split_dir / cname
        if not cdir.is_dir():
            continue
        files = sorted(p for p in cdir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{cdir}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        for p in files:
            xs.append(reader.read(p))
            ys.append(ci)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)  # (N, C, H, W), (N,)


def load_folder(
    root: str | Path | None = None,
    path: str | Path | None = None,
    channels: int | None = None,
    image_size: int | Sequence[int] | None = None,
) -> DatasetSplits:
    """Images in a class-per-folder layout: ``<folder>/train/<class>/*.png|jpg|jpeg|bmp`` and ``test/``.

    Classes are the sub-folders of ``train/`` sorted by name; ``test/`` may lack some but have no other.
    Files are read with Pillow in sorted order.

    Args:
        root: the dataset folder when ``path`` is None, else the data root ``path`` is relative to.
        path: the dataset folder, absolute or relative to a candidate root.
        channels: 1 (read as ``L``) or 3 (``RGB``); an image with another number of channels is an error
            naming it. None: every image must have the channels of the first one (1 or 3).
        image_size: resize every image to this size (int or ``[height, width]``, bilinear); None: every
            image must have the size of the first one.

    Returns:
        The splits; the dataset's display name is the folder's name.
    """
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    size = _image_size_opt(image_size)
    folder = _resolve_path(root, path, "folder", _FOLDER_EXPECT)
    train_dir, test_dir = folder / "train", folder / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found: the folder layout expects {_FOLDER_EXPECT} in {folder}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders: the folder layout expects {_FOLDER_EXPECT}")
    extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise DataError(f"{test_dir / extra[0]}: class '{extra[0]}' is not among the classes of {train_dir}")
    reader = _FolderReader(channels, size)
    xtr, ytr = _read_class_dirs(train_dir, classes, reader)
    if not any((test_dir / c).is_dir() for c in classes):
        raise DataError(f"{test_dir}: no class folders: the folder layout expects {_FOLDER_EXPECT}")
    xte, yte = _read_class_dirs(test_dir, classes, reader)
    return DatasetSplits(
        "folder",
        folder.name,
        _to_dataset(xtr, ytr, str(train_dir)),
        _to_dataset(xte, yte, str(test_dir)),
        classes,
    )


# --------------------------------------------------------------------------------------------------------
# Generic npz
# --------------------------------------------------------------------------------------------------------

_NPZ_EXPECT = (
    "'images' (N, H, W), (N, H, W, C) or (N, C, H, W) uint8 with C in {1, 3} and 'labels' (N,) integers"
)


def _npz_images(x: np.ndarray, path: Path, layout: str | None) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8, got {x.dtype} (expected {_NPZ_EXPECT})")
    if x.ndim == 3:
        return x[:, None]  # (N, 1, H, W)
    if x.ndim != 4:
        raise DataError(f"{path}: 'images' has shape {x.shape}: expected {_NPZ_EXPECT}")
    if layout is None:
        last, second = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last and second:
            raise DataError(
                f"{path}: 'images' shape {x.shape} is ambiguous: set options.layout to nhwc or nchw"
            )
        if not (last or second):
            raise DataError(f"{path}: 'images' has shape {x.shape}: expected {_NPZ_EXPECT}")
        layout = "nhwc" if last else "nchw"
    if layout == "nhwc":
        if x.shape[3] not in (1, 3):
            raise DataError(f"{path}: 'images' shape {x.shape} is not (N, H, W, C) with C in {{1, 3}}")
        return x.transpose(0, 3, 1, 2)  # (N, C, H, W)
    if x.shape[1] not in (1, 3):
        raise DataError(f"{path}: 'images' shape {x.shape} is not (N, C, H, W) with C in {{1, 3}}")
    return x


def load_npz(
    root: str | Path | None = None, path: str | Path | None = None, layout: str | None = None
) -> DatasetSplits:
    """A generic ``train.npz`` / ``test.npz`` pair (read without pickle).

    Each file holds ``images`` ((N, H, W), (N, H, W, C) or (N, C, H, W) uint8, C in {1, 3}) and ``labels``
    ((N,) integers in 0..K-1), optionally ``class_names`` (a (K,) string array). The class count K is
    ``len(class_names)`` when given, else the largest label + 1 over both splits.

    Args:
        root: the folder holding the files when ``path`` is None, else the data root for ``path``.
        path: the folder, absolute or relative to a candidate root.
        layout: ``nhwc`` or ``nchw`` for 4-D images whose layout is ambiguous (e.g. (N, 3, 3, 3)).
    """
    if layout not in (None, "nhwc", "nchw"):
        raise ConfigError(f"layout must be nhwc or nchw, got {layout!r}")
    folder = _resolve_path(root, path, "npz", "train.npz and test.npz")
    arrays = []
    names: list[str] | None = None
    for split in ("train", "test"):
        f = folder / f"{split}.npz"
        if not f.is_file():
            raise DataError(f"{f}: file not found: the npz layout expects train.npz and test.npz in {folder}")
        x = _npz_images(_npz_array(f, "images"), f, layout)
        y = _npz_array(f, "labels")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{f}: 'labels' must be (N,) integers, got {y.shape} {y.dtype}")
        if len(y) != len(x):
            raise DataError(f"{f}: {len(y)} labels for {len(x)} images")
        if y.size and int(y.min()) < 0:
            raise DataError(f"{f}: negative label {int(y.min())}")
        with np.load(f, allow_pickle=False) as z:
            if "class_names" in z.files and names is None:
                names = [str(s) for s in z["class_names"].tolist()]
        arrays.append((f, x, y))
    if arrays[0][1].shape[1:] != arrays[1][1].shape[1:]:
        raise DataError(
            f"{arrays[1][0]}: images of shape {arrays[1][1].shape[1:]} (C, H, W) but train.npz has "
            f"{arrays[0][1].shape[1:]}"
        )
    k = len(names) if names is not None else max(int(y.max()) + 1 if y.size else 0 for _, _, y in arrays)
    for f, _, y in arrays:
        _check_labels(y, k, str(f))
    names = names if names is not None else [str(i) for i in range(k)]
    (ftr, xtr, ytr), (fte, xte, yte) = arrays
    return DatasetSplits(
        "npz", folder.name, _to_dataset(xtr, ytr, str(ftr)), _to_dataset(xte, yte, str(fte)), names
    )


# --------------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------------


def load_synthetic(
    num_classes: int = 4,
    channels: int = 1,
    size: int = 8,
    num_train: int = 200,
    num_test: int = 100,
    noise: float = 0.2,
    seed: int = 0,
    root: str | Path | None = None,
) -> DatasetSplits:
    """A small deterministic, learnable image dataset for tests.

    Each class has a smooth random template (a ``3x3`` random pattern in [0, 1] upsampled bilinearly to
    ``size x size``); an image is its class template plus Gaussian noise of std ``noise``, clipped to
    [0, 1] and stored as uint8 ``round(255 v)``. Labels cycle ``0, 1, ..., K-1, 0, ...`` so the classes are
    balanced. Train and test images are consecutive draws of one generator seeded with ``seed``, so they
    never coincide (with noise > 0) and the same arguments always give the same tensors.

    Args:
        num_classes: number of classes (>= 2).
        channels: 1 or 3.
        size: image height and width (>= 2).
        num_train: training images (>= 1).
        num_test: test images (>= 1).
        noise: std of the pixel noise on the [0, 1] scale (>= 0).
        seed: generator seed.
        root: ignored.
    """
    del root
    _opt_int("num_classes", num_classes, 2)
    _opt_int("size", size, 2)
    _opt_int("num_train", num_train, 1)
    _opt_int("num_test", num_test, 1)
    _opt_int("seed", seed, 0)
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(noise, bool) or not isinstance(noise, int | float) or noise < 0:
        raise ConfigError(f"noise must be a number >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(num_classes, channels, 3, 3, generator=g)  # (K, C, 3, 3)
    templates = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=True)  # (K, C, S, S)

    def draw(n: int, split: str) -> ArrayDataset:
        y = torch.arange(n) % num_classes  # (n,)
        x = templates[y] + float(noise) * torch.randn(n, channels, size, size, generator=g)  # (n, C, S, S)
        img = (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        return ArrayDataset(img, y.long(), None, f"synthetic ({split} split)")

    train = draw(num_train, "train")
    test = draw(num_test, "test")
    return DatasetSplits("synthetic", "Synthetic", train, test, [f"class{i}" for i in range(num_classes)])


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    Attributes:
        name: the registry name used in configs.
        load: the loader; called as ``load(root=..., **options)``.
        num_classes: the fixed number of fine classes, or None when it depends on files or options.
        num_coarse: the number of coarse classes when the dataset has coarse labels, else None.
    """

    name: str
    load: Callable[..., DatasetSplits]
    num_classes: int | None = None
    num_coarse: int | None = None

    @property
    def option_names(self) -> list[str]:
        """Keyword options of the loader (everything but ``root``)."""
        return [p for p in inspect.signature(self.load).parameters if p != "root"]

    def option_default(self, option: str) -> Any:
        """The loader's default value of ``option``."""
        return inspect.signature(self.load).parameters[option].default

    def classes_for(self, options: dict[str, Any] | None = None, label: str = "fine") -> int | None:
        """Number of classes of ``label`` (fine/coarse) with these options, when known before loading."""
        if label == "coarse":
            return self.num_coarse
        if self.name == "synthetic":
            n = (options or {}).get("num_classes", self.option_default("num_classes"))
            return n if isinstance(n, int) and not isinstance(n, bool) else None
        return self.num_classes


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    load: Callable[..., DatasetSplits],
    num_classes: int | None = None,
    num_coarse: int | None = None,
) -> None:
    """Register a loader under ``name`` so configs can use it (it must accept a ``root`` keyword)."""
    if "root" not in inspect.signature(load).parameters:
        raise ValueError(f"dataset loader for '{name}' must accept a 'root' keyword")
    DATASETS[name] = DatasetSpec(name, load, num_classes, num_coarse)


register_dataset("digits", load_digits, 10)
register_dataset("mnist", load_mnist, 10)
register_dataset("fashion_mnist", load_fashion_mnist, 10, 4)
register_dataset("kmnist", load_kmnist, 10)
register_dataset("kmnist10k", load_kmnist10k, 10)
register_dataset("cifar10", load_cifar10, 10)
register_dataset("cifar100", load_cifar100, 100, 20)
register_dataset("folder", load_folder)
register_dataset("npz", load_npz)
register_dataset("synthetic", load_synthetic)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})")
    return DATASETS[name]


def load_dataset(name: str, root: str | Path | None = None, **options: Any) -> DatasetSplits:
    """Load a registered dataset by name.

    Args:
        name: a key of :data:`DATASETS`.
        root: an explicit data root (else ``VIRTNET_DATA_ROOT``, ``../shared/data``, ``/usr/share/datasets``).
        **options: the loader's options (e.g. ``channels`` for ``folder``).

    Raises:
        ConfigError: unknown dataset or option.
        DataError: files missing or malformed.
    """
    spec = get_dataset_spec(name)
    bad = [k for k in options if k not in spec.option_names]
    if bad:
        known = ", ".join(spec.option_names) or "none"
        raise ConfigError(f"unknown option '{bad[0]}' for dataset {name} (options: {known})")
    return spec.load(root=root, **options)


__all__ = [
    "DATASETS",
    "FASHION_MNIST_COARSE",
    "FASHION_MNIST_COARSE_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "KMNIST_CLASSES",
    "KMNIST10K_SPLIT_SEED",
    "DatasetSpec",
    "DatasetSplits",
    "RestrictedUnpickler",
    "get_dataset_spec",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_folder",
    "load_kmnist",
    "load_kmnist10k",
    "load_mnist",
    "load_npz",
    "load_synthetic",
    "read_idx",
    "register_dataset",
    "unpickle_restricted",
]
