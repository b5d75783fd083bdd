"""Scenario builders: loaded datasets -> a :class:`TaskSet` of tasks.

A task is made from one dataset's splits by :func:`make_task`, which applies, in this order:

1. ``label``: the fine labels, or the coarse ones (CIFAR-100's 20 superclasses, Fashion-MNIST's grouping);
2. ``classes``: keep the images of these source classes, labels remapped to ``0..n-1`` in the order given;
3. ``label_map``: or map each kept source class to a new label (a coarse grouping);
4. ``attributes``: or derive a multilabel task, one binary output per attribute (with a known-label mask
   when an attribute is ``labelled`` only on some classes);
5. ``train_size`` / ``test_size``: seeded stratified subsampling of the kept images;
6. ``val_fraction``: a seeded stratified part of the (subsampled) training images held out as ``val``;
7. ``transforms``: fixed per-task input transforms of every split's images (pixel permutation, rotation,
   resize, channel count; :mod:`virtnet.data.transforms`);
8. ``mean`` / ``std``: per-channel statistics of the final training images scaled to [0, 1].

Official train/test splits are kept as they are; the splits made here (val, subsamples) only ever pick
from one official split, so no image is shared between a task's train, val and test splits.

Scenarios: :func:`split_classes` (one dataset's classes split into tasks), :func:`datasets_as_tasks`
(several datasets, one task each), :func:`coarse_fine` (coarse and fine labels of the same images) and
:func:`attribute_task` (one multilabel task of binary attributes).
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from virtnet.data.core import ArrayDataset, AugmentSpec, Task, TaskSet
from virtnet.data.datasets import DatasetSplits
from virtnet.data.transforms import apply_transforms, check_transforms
from virtnet.errors import ConfigError, DataError, DataWarning

TASK_NAME_PATTERN = r"[A-Za-z0-9_-]+"


# --------------------------------------------------------------------------------------------------------
# Seeds and splits
# --------------------------------------------------------------------------------------------------------


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (ints, strings), stable across processes and Python versions."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") & ((1 << 63) - 1)


def make_generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` ``(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def stratified_take(
    labels: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``n`` of the positions of ``labels`` stratified by label; return (taken, rest), each ascending.

    Class ``k`` with ``c_k`` of the ``N`` items gets ``floor(n * c_k / N)`` picks; the remaining picks go
    to the classes with the largest remainders ``n * c_k mod N`` (ties: smaller label first). Within a
    class the picked items are the first of a random permutation drawn from ``generator``, classes in
    ascending label order.

    Args:
        labels: ``(N,)`` integer labels.
        n: how many to take, ``0 <= n <= N``.
        generator: source of randomness.

    Returns:
        ``(taken, rest)``: LongTensors of positions into ``labels``, disjoint, covering ``0..N-1``.
    """
    total = int(labels.shape[0])
    if not 0 <= n <= total:
        raise ValueError(f"cannot take {n} of {total} items")
    classes, counts = torch.unique(labels, return_counts=True)  # (K,), (K,)
    base = (n * counts) // total if total else counts * 0  # (K,)
    rem = (n * counts) % total if total else counts * 0
    extra = n - int(base.sum())
    order = torch.argsort(-rem, stable=True)
    base[order[:extra]] += 1
    taken: list[torch.Tensor] = []
    for k, cls in enumerate(classes.tolist()):
        members = torch.nonzero(labels == cls).squeeze(1)  # (c_k,)
        perm = torch.randperm(len(members), generator=generator)
        taken.append(members[perm[: int(base[k])]])
    take = torch.sort(torch.cat(taken)).values if taken else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(total, dtype=torch.bool)
    keep[take] = False
    return take, torch.nonzero(keep).squeeze(1)


def channel_stats(images: torch.Tensor, source: str = "") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images scaled to [0, 1].

    Computed exactly from per-channel histograms in float64, without a float copy of the images.

    Args:
        images: ``(N, C, H, W)`` uint8.
        source: names the data in the error for a constant channel.

    Returns:
        ``(mean, std)``, each a tuple of C floats.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise DataError(
            f"{source or 'images'}: need a non-empty (N, C, H, W) uint8 tensor, got {tuple(images.shape)}"
        )
    v = torch.arange(256, dtype=torch.float64) / 255.0  # (256,)
    means: list[float] = []
    stds: list[float] = []
    for ch in range(images.shape[1]):
        counts = torch.bincount(images[:, ch].reshape(-1), minlength=256).double()  # (256,)
        total = counts.sum()
        mean = float((counts * v).sum() / total)
        var = float((counts * (v - mean) ** 2).sum() / total)
        std = math.sqrt(max(var, 0.0))
        if std == 0.0:
            raise DataError(f"{source or 'images'}: channel {ch} is constant ({mean:.4f}): cannot normalise")
        means.append(mean)
        stds.append(std)
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------------------------------------
# One task
# --------------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_task_name(name: Any, key: str = "name") -> str:
    """Task names key modules and state-dict entries: non-empty, letters, digits, ``_`` and ``-`` only."""
    if not isinstance(name, str) or not re.fullmatch(TASK_NAME_PATTERN, name):
        raise ConfigError(f"{key}: task name {name!r} must match {TASK_NAME_PATTERN} (no dots or spaces)")
    return name


def check_classes(classes: Any, num_classes: int, dataset: str, key: str) -> list[int]:
    """Validate a list of distinct source classes in ``0..num_classes-1`` (``key`` prefixes the error)."""
    if not isinstance(classes, list | tuple) or not classes:
        raise ConfigError(f"{key}: expected a non-empty list of class indices, got {classes!r}")
    seen: set[int] = set()
    for c in classes:
        if not _is_int(c):
            raise ConfigError(f"{key}: class {c!r} is not an integer")
        if not 0 <= c < num_classes:
            raise ConfigError(f"{key}: class {c} does not exist in {dataset} ({num_classes} classes)")
        if c in seen:
            raise ConfigError(f"{key}: class {c} is listed twice")
        seen.add(c)
    return list(classes)


def check_label_map(label_map: Any, selected: Sequence[int], key: str) -> dict[int, int]:
    """A label map must map exactly the selected classes onto ``0..m-1`` with every new label used."""
    if not isinstance(label_map, Mapping) or not label_map:
        raise ConfigError(
            f"{key}: expected a non-empty mapping {{source class: new label}}, got {label_map!r}"
        )
    lm = {}
    for k, v in label_map.items():
        if not _is_int(k) or not _is_int(v):
            raise ConfigError(f"{key}: entries must be integer class -> integer label, got {k!r}: {v!r}")
        lm[int(k)] = int(v)
    missing = [c for c in selected if c not in lm]
    if missing:
        raise ConfigError(f"{key}: does not cover class {missing[0]} (selected classes: {list(selected)})")
    extra = sorted(c for c in lm if c not in set(selected))
    if extra:
        raise ConfigError(f"{key}: maps class {extra[0]}, which is not a selected class ({list(selected)})")
    used = sorted(set(lm.values()))
    if used != list(range(len(used))):
        raise ConfigError(f"{key}: new labels must be 0..m-1 with none unused, got {used}")
    return lm


def _attribute_entry(spec: Any) -> tuple[Any, Any]:
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in ("positive", "labelled")]
        if unknown or "positive" not in spec:
            raise ConfigError(
                f"expected [positive classes] or {{positive: [...], labelled: [...]}}, got {dict(spec)!r}"
            )
        return spec["positive"], spec.get("labelled")
    if hasattr(spec, "positive"):
        return spec.positive, getattr(spec, "labelled", None)
    return spec, None


def attribute_table(
    attributes: Mapping[str, Any], selected: Sequence[int], num_classes: int, dataset: str, key: str
) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """Validate attributes and build their class tables.

    Args:
        attributes: ``{name: [positive classes]}`` or ``{name: {positive: [...], labelled: [...]}}``.
        selected: the task's source classes.
        num_classes: the source class count.
        dataset: the dataset's name (for errors).
        key: the config key prefixing errors.

    Returns:
        ``(names, positive, labelled)``: ``positive`` ``(A, K)`` bool, True where class ``k`` has
        attribute ``a``; ``labelled`` ``(A, K)`` bool, True where it is known, or None when every attribute
        is known for every class.
    """
    if not isinstance(attributes, Mapping) or not attributes:
        raise ConfigError(f"{key}: expected a non-empty mapping {{attribute: [positive classes]}}")
    names: list[str] = []
    a_count = len(attributes)
    pos = torch.zeros(a_count, num_classes, dtype=torch.bool)  # (A, K)
    lab = torch.zeros(a_count, num_classes, dtype=torch.bool)  # (A, K)
    partial = False
    sel = set(selected)
    for a, (name, spec) in enumerate(attributes.items()):
        akey = f"{key}.{name}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: attribute names must be non-empty strings, got {name!r}")
        try:
            positive, labelled = _attribute_entry(spec)
        except ConfigError as e:
            raise ConfigError(f"{akey}: {e}") from None
        positive = check_classes(positive, num_classes, dataset, f"{akey}.positive")
        if labelled is None:
            lab[a] = True
        else:
            labelled = check_classes(labelled, num_classes, dataset, f"{akey}.labelled")
            lab[a, labelled] = True
            partial = True
            out = [c for c in positive if c not in set(labelled)]
            if out:
                raise ConfigError(f"{akey}.positive: class {out[0]} is positive but not in labelled")
        notsel = [c for c in positive if c not in sel]
        if notsel:
            raise ConfigError(
                f"{akey}.positive: class {notsel[0]} is not among the task's classes {list(selected)}"
            )
        pos[a, positive] = True
        known = [c for c in selected if lab[a, c]]
        if not known:
            raise ConfigError(f"{akey}.labelled: none of the task's classes {list(selected)} is labelled")
        if all(pos[a, c] for c in known):
            raise ConfigError(f"{akey}: positive for every labelled class of the task: no negative examples")
        names.append(name)
    if partial and bool(lab[:, list(selected)].all()):
        partial = False
    return names, pos, (lab if partial else None)


def make_task(
    name: str,
    data: DatasetSplits,
    *,
    label: str = "fine",
    classes: Sequence[int] | None = None,
    label_map: Mapping[int, int] | None = None,
    attributes: Mapping[str, Any] | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.0,
    augment: AugmentSpec | None = None,
    seed: int = 0,
    sample_key: str | None = None,
    transforms: Sequence[Mapping[str, Any]] | None = None,
    where: str | None = None,
    val_default: bool = False,
) -> Task:
    """Build one task from a dataset (see the module docstring for the order of the steps).

    Args:
        name: the task's name (letters, digits, ``_``, ``-``).
        data: the loaded dataset.
        label: ``fine`` or ``coarse`` (datasets with coarse labels).
        classes: source classes to keep, remapped to ``0..n-1`` in this order (None: all).
        label_map: ``{source class: new label}`` covering exactly the kept classes, new labels ``0..m-1``.
        attributes: ``{attribute: [positive classes]}`` or ``{attribute: {positive: [...],
            labelled: [...]}}``: a multilabel task with one 0/1 output per attribute; images of classes
            outside ``labelled`` get mask False for that attribute.
        train_size: subsample the training images to this many (stratified by fine class, seeded).
        test_size: subsample the test images likewise.
        val_fraction: hold out ``floor(val_fraction * N_train + 0.5)`` training images (stratified) as
            the ``val`` split, in [0, 1); 0: no val split.
        augment: training augmentation (default none).
        seed: the run seed; subsampling and the val split use generators derived from ``(seed,
            sample_key, step)``.
        sample_key: identifies the image selection (default ``name``); tasks sharing it and their kept
            images (e.g. coarse and fine labels of one dataset) get the same subsample.
        transforms: per-task input transforms applied to every split's images, in order, e.g.
            ``[{"kind": "permute_pixels", "seed": 1}]``, ``[{"kind": "rotate", "degrees": 45}]``,
            ``[{"kind": "resize", "size": 32}, {"kind": "channels", "count": 3, "mode": "colorize",
            "seed": 0}]`` (:mod:`virtnet.data.transforms`); the task's input shape and ``mean``/``std``
            are those of the transformed images.
        where: config key prefixing errors (e.g. ``data.tasks[1]``); None prefixes ``task '<name>':``.
        val_default: ``val_fraction`` is a default (``data.val_fraction``), not the task's own: when it
            leaves no val image or no training image, the task gets no val split and a
            :class:`virtnet.errors.DataWarning` instead of a ConfigError.

    Returns:
        The task, with per-channel ``mean``/``std`` of its final training images.

    Raises:
        ConfigError: an invalid option (naming the key).
        DataError: a split ends up empty.
    """

    def key(field: str) -> str:
        return f"{where}.{field}" if where else f"task '{name}': {field}"

    check_task_name(name, key("name") if where else f"task {name!r}")
    base = data
    if label == "coarse":
        if not data.has_coarse:
            raise ConfigError(
                f"{key('label')}: {data.key} has no coarse labels (cifar100 and fashion_mnist do)"
            )
        data = data.coarse()
    elif label != "fine":
        raise ConfigError(f"{key('label')}: expected fine or coarse, got {label!r}")
    n_src = data.num_classes
    selected = (
        list(range(n_src)) if classes is None else check_classes(classes, n_src, data.key, key("classes"))
    )
    if label_map is not None and attributes is not None:
        raise ConfigError(f"{key('attributes')}: cannot be combined with label_map")
    tfs = check_transforms(transforms or [], key("transforms"))

    lut = torch.full((n_src,), -1, dtype=torch.long)  # source class -> new label
    attr = None
    if attributes is not None:
        attr_names, pos, lab = attribute_table(attributes, selected, n_src, data.key, key("attributes"))
        attr = (pos, lab)
        num_outputs, kind, class_names = len(attr_names), "multilabel", attr_names
    elif label_map is not None:
        lm = check_label_map(label_map, selected, key("label_map"))
        num_outputs = len(set(lm.values()))
        for c, v in lm.items():
            lut[c] = v
        class_names = [
            "+".join(data.class_names[c] for c in selected if lm[c] == j) for j in range(num_outputs)
        ]
        kind = "multiclass"
    else:
        lut[selected] = torch.arange(len(selected))
        num_outputs, kind, class_names = len(selected), "multiclass", [data.class_names[c] for c in selected]

    sel_t = torch.tensor(selected, dtype=torch.long)
    tr_idx = torch.nonzero(torch.isin(data.train.labels, sel_t)).squeeze(1)  # (N_train,)
    te_idx = torch.nonzero(torch.isin(data.test.labels, sel_t)).squeeze(1)  # (N_test,)
    skey = sample_key or name
    for split, idx, size in (("train", tr_idx, train_size), ("test", te_idx, test_size)):
        if size is None:
            continue
        if not _is_int(size) or size < 1:
            raise ConfigError(f"{key(split + '_size')}: expected a positive integer, got {size!r}")
        if size > len(idx):
            raise ConfigError(
                f"{key(split + '_size')}: {size} > the {len(idx)} {split} images of the task's classes"
            )
        strata = getattr(base, split).labels[idx]
        take, _ = stratified_take(strata, size, make_generator(seed, skey, f"{split}_size"))
        if split == "train":
            tr_idx = idx[take]
        else:
            te_idx = idx[take]

    val_idx = None
    if (
        not isinstance(val_fraction, int | float)
        or isinstance(val_fraction, bool)
        or not 0 <= val_fraction < 1
    ):
        raise ConfigError(f"{key('val_fraction')}: expected a number in [0, 1), got {val_fraction!r}")
    n_val = int(math.floor(val_fraction * len(tr_idx) + 0.5)) if val_fraction > 0 else 0
    if val_fraction > 0 and (n_val < 1 or n_val >= len(tr_idx)):
        leaves = (
            f"{val_fraction} of {len(tr_idx)} training images leaves {n_val} for val and "
            f"{len(tr_idx) - n_val} for train"
        )
        if not val_default:
            raise ConfigError(f"{key('val_fraction')}: {leaves}; both must be >= 1")
        warnings.warn(
            f"{key('val_fraction')}: the default data.val_fraction {leaves}: task '{name}' gets no "
            "validation split (choices made on val will refuse it); set the task's val_fraction to decide",
            DataWarning,
            stacklevel=2,
        )
        n_val = 0
    if n_val > 0:
        v, rest = stratified_take(base.train.labels[tr_idx], n_val, make_generator(seed, skey, "val"))
        val_idx, tr_idx = tr_idx[v], tr_idx[rest]

    for split, idx in (("train", tr_idx), ("test", te_idx)):
        if len(idx) == 0:
            raise DataError(
                f"task '{name}': no {split} images of classes {selected} in {getattr(data, split).source}"
            )

    def build(ds: ArrayDataset, idx: torch.Tensor, split: str) -> ArrayDataset:
        src = ds.labels[idx]  # (n,)
        mask = None
        if attr is not None:
            pos, lab = attr
            y = pos[:, src].T.float()  # (n, A)
            if lab is not None:
                mask = lab[:, src].T.contiguous()  # (n, A)
            y = y.contiguous()
        else:
            y = lut[src]  # (n,)
        images = apply_transforms(ds.images[idx], tfs, split=split, where=key("transforms"))
        return ArrayDataset(images, y, mask, f"{ds.source} [task {name}, {split}]")

    train = build(data.train, tr_idx, "train")
    test = build(data.test, te_idx, "test")
    val = build(data.train, val_idx, "val") if val_idx is not None else None
    mean, std = channel_stats(train.images, train.source)
    return Task(
        name=name,
        train=train,
        test=test,
        num_outputs=num_outputs,
        kind=kind,  # type: ignore[arg-type]
        class_names=class_names,
        mean=mean,
        std=std,
        augment=augment or AugmentSpec(),
        val=val,
    )


# --------------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------------


def class_splits(
    num_classes: int, num_tasks: int | None, splits: Sequence[Sequence[int]] | None, dataset: str, key: str
) -> list[list[int]]:
    """The class lists of a split-classes scenario.

    Args:
        num_classes: the dataset's class count.
        num_tasks: split the classes into this many equal consecutive groups (must divide ``num_classes``).
        splits: or explicit class lists (non-empty, disjoint).
        dataset: the dataset's name for errors.
        key: the config key prefixing errors (e.g. ``data.scenario``).
    """
    if (num_tasks is None) == (splits is None):
        raise ConfigError(f"{key}: give exactly one of num_tasks and splits")
    if num_tasks is not None:
        if not _is_int(num_tasks) or num_tasks < 1:
            raise ConfigError(f"{key}.num_tasks: expected a positive integer, got {num_tasks!r}")
        if num_classes % num_tasks:
            raise ConfigError(
                f"{key}.num_tasks: {num_tasks} does not divide the {num_classes} classes of {dataset} "
                f"(give splits explicitly)"
            )
        per = num_classes // num_tasks
        return [list(range(i * per, (i + 1) * per)) for i in range(num_tasks)]
    assert splits is not None
    if not isinstance(splits, list | tuple) or not splits:
        raise ConfigError(f"{key}.splits: expected a non-empty list of class lists")
    out: list[list[int]] = []
    owner: dict[int, int] = {}
    for i, s in enumerate(splits):
        cl = check_classes(s, num_classes, dataset, f"{key}.splits[{i}]")
        for c in cl:
            if c in owner:
                raise ConfigError(f"{key}.splits[{i}]: class {c} is already in splits[{owner[c]}]")
            owner[c] = i
        out.append(cl)
    return out


def split_classes(
    data: DatasetSplits,
    num_tasks: int | None = None,
    splits: Sequence[Sequence[int]] | None = None,
    *,
    prefix: str | None = None,
    seed: int = 0,
    **task_options: Any,
) -> TaskSet:
    """Split one dataset's classes into tasks ``<prefix>_0``, ``<prefix>_1``...

    Args:
        data: the dataset.
        num_tasks: equal consecutive class groups (e.g. 10 classes, 2 tasks: 0-4 and 5-9).
        splits: or explicit class lists; labels are remapped to ``0..n-1`` in the order listed.
        prefix: task name prefix (default the dataset key).
        seed: run seed (subsampling, val splits).
        **task_options: passed to :func:`make_task` (``label``, ``train_size``, ``val_fraction``...).
    """
    n = data.coarse().num_classes if task_options.get("label") == "coarse" else data.num_classes
    groups = class_splits(n, num_tasks, splits, data.key, "split_classes")
    prefix = prefix or data.key
    tasks = [
        make_task(f"{prefix}_{i}", data, classes=g, seed=seed, **task_options) for i, g in enumerate(groups)
    ]
    return TaskSet(tasks, name=f"{data.name} split into {len(tasks)}")


def datasets_as_tasks(
    datasets: Mapping[str, DatasetSplits] | Sequence[DatasetSplits], *, seed: int = 0, **task_options: Any
) -> TaskSet:
    """One task per dataset (sizes and channels may differ).

    Args:
        datasets: ``{task name: dataset}``, or a sequence of datasets named by their keys.
        seed: run seed.
        **task_options: passed to :func:`make_task` for every task.
    """
    items = list(datasets.items()) if isinstance(datasets, Mapping) else [(d.key, d) for d in datasets]
    tasks = [make_task(n, d, seed=seed, **task_options) for n, d in items]
    return TaskSet(tasks, name="+".join(d.name for _, d in items))


def coarse_fine(
    data: DatasetSplits,
    *,
    names: tuple[str, str] | None = None,
    coarse_map: Mapping[int, int] | None = None,
    seed: int = 0,
    where: str | None = None,
    **task_options: Any,
) -> TaskSet:
    """Coarse and fine labels of the same images as two tasks (``<key>_coarse``, ``<key>_fine``).

    Both tasks hold exactly the same images (subsampling and the val split share one ``sample_key`` and
    are stratified by fine class). For CIFAR-100: 20 superclasses and 100 classes; for Fashion-MNIST: the
    4 groups of :data:`virtnet.data.datasets.FASHION_MNIST_COARSE` and the 10 classes. ``coarse_map``
    gives a grouping of one's own (any dataset, with or without coarse labels).

    Args:
        data: a dataset with coarse labels, or any dataset with ``coarse_map``.
        names: the two task names (coarse, fine).
        coarse_map: ``{fine class: coarse group}`` covering every fine class, groups ``0..m-1`` all used
            (None: the dataset's own coarse labels).
        seed: run seed.
        where: the config key prefixing errors (default ``coarse_fine``, and the task for a task's).
        **task_options: ``train_size``, ``test_size``, ``val_fraction``, ``augment``, ``transforms``.
    """
    at = where or "coarse_fine"
    bad = [k for k in task_options if k in ("label", "classes", "label_map", "attributes", "sample_key")]
    if bad:
        raise ConfigError(f"{at}: option {bad[0]} is not supported (both tasks keep every class)")
    if coarse_map is not None:
        coarse_map = check_label_map(coarse_map, list(range(data.num_classes)), f"{at}.coarse_map")
        coarse_opts: dict[str, Any] = {"label": "fine", "label_map": coarse_map}
    elif not data.has_coarse:
        raise ConfigError(
            f"{at}: {data.key} has no coarse labels (cifar100 and fashion_mnist do; or give coarse_map)"
        )
    else:
        coarse_opts = {"label": "coarse"}
    cn, fn = names or (f"{data.key}_coarse", f"{data.key}_fine")
    tasks = [
        make_task(cn, data, seed=seed, sample_key=data.key, where=where, **coarse_opts, **task_options),
        make_task(fn, data, label="fine", seed=seed, sample_key=data.key, where=where, **task_options),
    ]
    return TaskSet(tasks, name=f"{data.name} coarse+fine")


def attribute_task(
    data: DatasetSplits,
    attributes: Mapping[str, Any],
    *,
    name: str | None = None,
    seed: int = 0,
    **task_options: Any,
) -> TaskSet:
    """One multilabel task of binary attributes derived from class labels.

    Args:
        data: the dataset.
        attributes: ``{attribute: [positive classes]}`` or ``{attribute: {positive: [...], labelled:
            [...]}}``; labels are ``(N, A)`` float 0/1, the mask ``(N, A)`` bool is False for images of
            classes outside an attribute's ``labelled`` list (None when every label is known).
        name: the task's name (default ``<key>_attributes``).
        seed: run seed.
        **task_options: passed to :func:`make_task` (``classes``, ``train_size``...).
    """
    task = make_task(name or f"{data.key}_attributes", data, attributes=attributes, seed=seed, **task_options)
    return TaskSet([task], name=f"{data.name} attributes")


__all__ = [
    "TASK_NAME_PATTERN",
    "attribute_table",
    "attribute_task",
    "channel_stats",
    "check_classes",
    "check_label_map",
    "check_task_name",
    "class_splits",
    "coarse_fine",
    "datasets_as_tasks",
    "derive_seed",
    "make_generator",
    "make_task",
    "split_classes",
    "stratified_take",
]
