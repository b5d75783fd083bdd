"""The ``data:`` section of a run config: a whole multi-task scenario without code.

::

    data:
      root: null              # else VIRTNET_DATA_ROOT, ../shared/data, /usr/share/datasets
      sampling: all           # all | round_robin | proportional (see virtnet.data.loader)
      val_fraction: 0.1       # default validation split of every task without its own (0: none)
      scenario:               # optional shorthand expanding to tasks
        kind: split_classes   # split_classes | coarse_fine | attributes | datasets
        dataset: digits
        num_tasks: 2          # or splits: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
      tasks:                  # explicit tasks (alone, or after the scenario's tasks)
        - name: mnist
          dataset: mnist
          classes: [0, 1, 2]

Every key is documented in docs/data.md. Structural problems (unknown keys, unknown datasets, classes that
do not exist, label maps that do not cover the classes, duplicate task names) are found when the config is
validated, as one-line :class:`ConfigError` messages naming the key, e.g.
``data.tasks[1].classes: class 12 does not exist in fashion_mnist (10 classes)``. Problems that depend on
the files (the class count of a ``folder`` dataset) are found by :func:`build_taskset`, with the same
key-naming messages.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from virtnet.data.core import AugmentSpec, Task, TaskSet
from virtnet.data.datasets import DATASETS, DatasetSplits, get_dataset_spec, load_dataset
from virtnet.data.scenarios import (
    TASK_NAME_PATTERN,
    attribute_table,
    check_classes,
    check_label_map,
    check_task_name,
    class_splits,
    coarse_fine,
    make_task,
)
from virtnet.data.transforms import CHANNEL_COUNTS, CHANNEL_MODES
from virtnet.errors import ConfigError
from virtnet.schema import Seed, Strict, _number_problem

_MARK = "\x00"
SYNTHETIC_MAX_BYTES = 2 * 10**9
"""The largest synthetic dataset (uint8 image bytes) a config may ask for."""
DEFAULT_VAL_FRACTION = 0.1
"""``data.val_fraction``'s default: the share of every task's training images held out as its ``val``
split unless the task (or scenario) sets its own ``val_fraction`` (0: none)."""


def _fail(msg: str) -> PydanticCustomError:
    return PydanticCustomError("virtnet_data", "{msg}", {"msg": msg})


def _check(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a ``scenarios`` checker inside a pydantic validator: its ConfigError becomes a validation error
    whose message drops the key prefix (pydantic supplies the key)."""
    try:
        return fn(*args, _MARK)
    except ConfigError as e:
        msg = str(e)
        for prefix in (_MARK + ": ", _MARK + "."):
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
        raise _fail(msg.replace(_MARK, "")) from None


def _known_dataset(name: str) -> str:
    try:
        get_dataset_spec(name)
    except ConfigError as e:
        raise _fail(str(e)) from None
    return name


def _check_options(dataset: str | None, options: dict[str, Any]) -> dict[str, Any]:
    if dataset is None or dataset not in DATASETS:
        return options
    spec = DATASETS[dataset]
    bad = [k for k in options if k not in spec.option_names]
    if bad:
        known = ", ".join(spec.option_names) or "none"
        raise _fail(f"unknown option '{bad[0]}' for dataset {dataset} (options: {known})")
    try:  # the loader's annotations say what each option is: strict numbers, as in every section
        hints = typing.get_type_hints(spec.load)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: no type check, the loader checks
        hints = {}
    for k, v in options.items():
        problem = _number_problem(hints[k], v) if k in hints else None
        if problem:
            raise _fail(f"{k}: {problem}")
    if dataset == "synthetic":  # generated in memory: bound its size before anything is allocated
        keys = ("channels", "size", "num_train", "num_test")
        sizes = {k: options.get(k, spec.option_default(k)) for k in keys}
        if all(isinstance(v, int) for v in sizes.values()):
            nc = options.get("num_classes", 1)
            if any(v < 1 for v in sizes.values()) or (isinstance(nc, int) and nc < 1):
                raise _fail("synthetic: channels, size, num_train, num_test and num_classes must be positive")
            n = (sizes["num_train"] + sizes["num_test"]) * sizes["channels"] * sizes["size"] ** 2
            if n > SYNTHETIC_MAX_BYTES:
                raise _fail(f"synthetic: {n:.3g} bytes of images, more than {SYNTHETIC_MAX_BYTES:.0e}")
    return options


def _num_classes(data: dict[str, Any]) -> int | None:
    """The class count of the (valid) dataset/options/label seen so far, when known before loading."""
    dataset = data.get("dataset")
    if dataset is None or dataset not in DATASETS or "options" not in data:
        return None
    label = data.get("label") or "fine"
    return DATASETS[dataset].classes_for(data["options"], label)


def _check_label(dataset: str | None, label: str | None) -> str | None:
    if label == "coarse" and dataset in DATASETS and DATASETS[dataset].num_coarse is None:
        have = ", ".join(sorted(n for n, s in DATASETS.items() if s.num_coarse is not None))
        raise _fail(f"{dataset} has no coarse labels (datasets with coarse labels: {have})")
    return label


def _attrs_plain(attributes: dict[str, Any] | None) -> dict[str, Any] | None:
    if attributes is None:
        return None
    return {k: (v.model_dump() if isinstance(v, AttributeConfig) else list(v)) for k, v in attributes.items()}


class AugmentConfig(Strict):
    """``augment:`` training augmentation of a task."""

    crop_padding: int = Field(default=0, ge=0)  # random crop of the original size after zero padding
    hflip: bool = False  # random horizontal flip with probability 1/2

    def spec(self) -> AugmentSpec:
        """The :class:`AugmentSpec` of these settings."""
        return AugmentSpec(crop_padding=self.crop_padding, hflip=self.hflip)


class AttributeConfig(Strict):
    """An attribute given as ``{positive: [...], labelled: [...]}``."""

    positive: list[int]  # classes that have the attribute
    labelled: list[int] | None = None  # classes where it is known (None: all); others get mask False


AttributesType = dict[str, list[int] | AttributeConfig]


class TransformConfig(Strict):
    """One entry of a task's ``transforms``: a fixed input transform of every image of the task
    (:mod:`virtnet.data.transforms`). A key the kind does not use is an error."""

    kind: Literal["permute_pixels", "rotate", "resize", "channels"]
    size: StrictInt | None = Field(default=None, validate_default=True)  # resize: the new side (N x N)
    count: StrictInt | None = Field(default=None, validate_default=True)  # channels: 1 or 3
    mode: str | None = Field(default=None, validate_default=True)  # channels: replicate | colorize
    degrees: float | None = Field(default=None, validate_default=True)  # rotate: counter-clockwise angle
    interpolation: Literal["nearest", "bilinear"] | None = Field(default=None, validate_default=True)
    # permute_pixels: the permutation's seed; channels with mode colorize: the colours' seed
    seed: Seed | None = Field(default=None, validate_default=True)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if kind == "channels":
            if "mode" not in info.data:  # the mode is invalid: reported there
                return v
            mode = info.data.get("mode") or "replicate"
            if mode == "colorize" and v is None:
                raise _fail("required for kind channels with mode colorize")
            if mode != "colorize" and v is not None:
                raise _fail(f"not used by kind channels with mode {mode} (used by: mode colorize)")
            return v
        if kind == "permute_pixels" and v is None:
            raise _fail("required for kind permute_pixels")
        if kind is not None and kind != "permute_pixels" and v is not None:
            raise _fail(f"not used by kind {kind} (used by: permute_pixels, channels with mode colorize)")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if kind == "resize" and v is None:
            raise _fail("required for kind resize")
        if kind is not None and kind != "resize" and v is not None:
            raise _fail(f"not used by kind {kind} (used by: resize)")
        if v is not None and v < 1:
            raise _fail(f"expected an integer >= 1, got {v}")
        return v

    @field_validator("count", "mode")
    @classmethod
    def _channels(cls, v: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if kind is not None and kind != "channels":
            if v is not None:
                raise _fail(f"not used by kind {kind} (used by: channels)")
            return v
        if info.field_name == "count":
            if kind == "channels" and v is None:
                raise _fail("required for kind channels (1 or 3)")
            if v is not None and v not in CHANNEL_COUNTS:
                raise _fail(f"expected 1 or 3, got {v}")
            return v
        if v is not None and v not in CHANNEL_MODES:
            raise _fail(f"expected one of {', '.join(CHANNEL_MODES)}, got {v!r}")
        if v is not None and v != "replicate" and info.data.get("count") == 1:
            raise _fail(f"{v} needs count 3, got count 1")
        return v

    @field_validator("degrees", "interpolation")
    @classmethod
    def _rotate(cls, v: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if kind == "rotate" and v is None and info.field_name == "degrees":
            raise _fail("required for kind rotate")
        if kind is not None and kind != "rotate" and v is not None:
            raise _fail(f"not used by kind {kind} (used by: rotate)")
        return v

    def spec(self) -> dict[str, Any]:
        """The plain dict :func:`virtnet.data.scenarios.make_task` takes."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TaskConfig(Strict):
    """One entry of ``data.tasks``."""

    name: str | None = None  # task name (default: the dataset name)
    dataset: str  # a registered dataset name
    root: str | None = None  # data root for this task (overrides data.root)
    options: dict[str, Any] = Field(default_factory=dict)  # loader options
    label: Literal["fine", "coarse"] = "fine"  # coarse: cifar100 superclasses, fashion_mnist groups
    classes: list[int] | None = None  # subset of source classes, remapped to 0..n-1 in this order
    label_map: dict[int, int] | None = None  # {source class: new label}, a coarse grouping
    attributes: AttributesType | None = None  # {name: [positive classes]} -> multilabel task
    train_size: int | None = Field(default=None, ge=1)  # stratified seeded subsample of train
    test_size: int | None = Field(default=None, ge=1)  # stratified seeded subsample of test
    # part of train held out as val; None: data.val_fraction; 0: no val split
    val_fraction: float | None = Field(default=None, ge=0.0, lt=1.0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    transforms: list[TransformConfig] = Field(default_factory=list)  # fixed input transforms, in order
    subsample_group: str | None = None  # tasks of one group share one seeded subsample of the dataset

    @property
    def task_name(self) -> str:
        """The task's name: ``name``, else the dataset name."""
        return self.name or self.dataset

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return v if v is None else _check(check_task_name, v)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return _known_dataset(v)

    @field_validator("subsample_group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(TASK_NAME_PATTERN, v):
            raise _fail(f"group name {v!r} must match {TASK_NAME_PATTERN}")
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _check_options(info.data.get("dataset"), v)

    @field_validator("label")
    @classmethod
    def _label(cls, v: str, info: ValidationInfo) -> str:
        _check_label(info.data.get("dataset"), v)
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        n = _num_classes(info.data)
        if v is None or n is None:
            if v is not None and not v:
                raise _fail("expected a non-empty list of class indices")
            return v
        return _check(check_classes, v, n, info.data["dataset"])

    @field_validator("label_map")
    @classmethod
    def _label_map(cls, v: dict[int, int] | None, info: ValidationInfo) -> dict[int, int] | None:
        if v is None or "classes" not in info.data:
            return v
        n = _num_classes(info.data)
        selected = (
            info.data["classes"] if info.data["classes"] is not None else (None if n is None else range(n))
        )
        if selected is None:
            return v
        return _check(check_label_map, v, list(selected))

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, v: AttributesType | None, info: ValidationInfo) -> AttributesType | None:
        if v is None:
            return v
        if info.data.get("label_map") is not None:
            raise _fail("cannot be combined with label_map")
        n = _num_classes(info.data)
        if n is None or "classes" not in info.data:
            return v
        selected = info.data["classes"] if info.data["classes"] is not None else list(range(n))
        _check(attribute_table, _attrs_plain(v), selected, n, info.data["dataset"])
        return v


ScenarioKind = Literal["split_classes", "coarse_fine", "attributes", "datasets"]
_USES = {
    "dataset": ("split_classes", "coarse_fine", "attributes"),
    "datasets": ("datasets",),
    "num_tasks": ("split_classes",),
    "splits": ("split_classes",),
    "attributes": ("attributes",),
    "label": ("split_classes", "attributes"),
    "name": ("split_classes", "coarse_fine", "attributes"),
    "options": ("split_classes", "coarse_fine", "attributes"),
    "coarse_map": ("coarse_fine",),
}


def _not_used(field: str, kind: str | None) -> PydanticCustomError:
    return _fail(f"not used by kind {kind} (used by: {', '.join(_USES[field])})")


class ScenarioConfig(Strict):
    """``data.scenario``: a shorthand that expands to tasks.

    Kinds: ``split_classes`` (``dataset`` with ``num_tasks`` or ``splits``; tasks ``<name>_0``...),
    ``coarse_fine`` (``dataset`` with coarse labels; tasks ``<name>_coarse``, ``<name>_fine``),
    ``attributes`` (``dataset`` and ``attributes``; one multilabel task ``<name>``, default
    ``<dataset>_attributes``), ``datasets`` (``datasets``: one task per dataset, named after it).
    """

    kind: ScenarioKind
    dataset: str | None = Field(default=None, validate_default=True)
    datasets: list[str] | None = Field(default=None, validate_default=True)
    name: str | None = None  # task name prefix (split_classes, coarse_fine) or task name (attributes)
    root: str | None = None  # data root (overrides data.root)
    options: dict[str, Any] = Field(default_factory=dict)  # loader options of `dataset`
    label: Literal["fine", "coarse"] | None = None  # split_classes / attributes: which labels
    num_tasks: int | None = Field(default=None, ge=1)  # split_classes: equal consecutive splits
    splits: list[list[int]] | None = Field(default=None, validate_default=True)  # or explicit splits
    attributes: AttributesType | None = Field(default=None, validate_default=True)
    train_size: int | None = Field(default=None, ge=1)  # per task
    test_size: int | None = Field(default=None, ge=1)  # per task
    val_fraction: float | None = Field(default=None, ge=0.0, lt=1.0)  # per task; None: data.val_fraction
    augment: AugmentConfig = Field(default_factory=AugmentConfig)  # per task
    # coarse_fine: {fine class: coarse group} (default: the dataset's own coarse labels)
    coarse_map: dict[int, int] | None = Field(default=None, validate_default=True)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind is None:
            return v
        if kind not in _USES["dataset"]:
            if v is not None:
                raise _not_used("dataset", kind)
            return v
        if v is None:
            raise _fail(f"required for kind {kind}")
        _known_dataset(v)  # coarse_fine's coarse labels: checked with coarse_map
        return v

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        kind = info.data.get("kind")
        if kind is None:
            return v
        if kind != "datasets":
            if v is not None:
                raise _not_used("datasets", kind)
            return v
        if not v:
            raise _fail("kind datasets needs a non-empty list of dataset names")
        for d in v:
            _known_dataset(d)
        dup = sorted({d for d in v if v.count(d) > 1})
        if dup:
            raise _fail(f"dataset {dup[0]} is listed twice (use explicit tasks with different names)")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("kind") == "datasets":
            raise _not_used("name", "datasets")
        return v if v is None else _check(check_task_name, v)

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if v and info.data.get("kind") == "datasets":
            raise _fail("not used by kind datasets (give per-dataset options with explicit tasks)")
        return _check_options(info.data.get("dataset"), v)

    @field_validator("label")
    @classmethod
    def _label(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if v is not None and kind is not None and kind not in _USES["label"]:
            raise _not_used("label", kind)
        return _check_label(info.data.get("dataset"), v)

    @field_validator("num_tasks")
    @classmethod
    def _num_tasks(cls, v: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if v is not None and kind is not None and kind != "split_classes":
            raise _not_used("num_tasks", kind)
        n = _num_classes(info.data)
        if v is not None and n is not None and n % v:
            raise _fail(
                f"{v} does not divide the {n} classes of {info.data['dataset']} (give splits explicitly)"
            )
        return v

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: list[list[int]] | None, info: ValidationInfo) -> list[list[int]] | None:
        kind = info.data.get("kind")
        if kind is None or "num_tasks" not in info.data:
            return v
        if kind != "split_classes":
            if v is not None:
                raise _not_used("splits", kind)
            return v
        if (v is None) == (info.data["num_tasks"] is None):
            raise _fail("give exactly one of num_tasks and splits")
        n = _num_classes(info.data)
        if v is not None and n is not None:
            try:
                class_splits(n, None, v, info.data["dataset"], _MARK)
            except ConfigError as e:
                raise _fail(str(e).removeprefix(_MARK + ".")) from None
        return v

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, v: AttributesType | None, info: ValidationInfo) -> AttributesType | None:
        kind = info.data.get("kind")
        if kind is None:
            return v
        if kind != "attributes":
            if v is not None:
                raise _not_used("attributes", kind)
            return v
        if v is None:
            raise _fail("required for kind attributes")
        n = _num_classes(info.data)
        if n is not None:
            _check(attribute_table, _attrs_plain(v), list(range(n)), n, info.data["dataset"])
        return v

    @field_validator("coarse_map")
    @classmethod
    def _coarse_map(cls, v: dict[int, int] | None, info: ValidationInfo) -> dict[int, int] | None:
        kind = info.data.get("kind")
        if kind is None or "dataset" not in info.data or info.data["dataset"] is None:
            return v
        if kind != "coarse_fine":
            if v is not None:
                raise _not_used("coarse_map", kind)
            return v
        dataset = info.data["dataset"]
        if v is None:
            if DATASETS[dataset].num_coarse is None:
                have = ", ".join(sorted(n for n, s in DATASETS.items() if s.num_coarse is not None))
                raise _fail(
                    f"{dataset} has no coarse labels of its own (datasets with coarse labels: {have}): give "
                    "coarse_map {fine class: coarse group}"
                )
            return v
        n = _num_classes({**info.data, "label": "fine"})
        if n is None:  # a folder dataset: checked when it is loaded
            return v
        return _check(check_label_map, v, list(range(n)))

    def task_names(self) -> list[str]:
        """The names of the tasks this scenario expands to."""
        if self.kind == "datasets":
            return list(self.datasets or [])
        prefix = self.name or str(self.dataset)
        if self.kind == "split_classes":
            return [f"{prefix}_{i}" for i in range(self.num_tasks or len(self.splits or []))]
        if self.kind == "coarse_fine":
            return [f"{prefix}_coarse", f"{prefix}_fine"]
        return [self.name or f"{self.dataset}_attributes"]


#: what every task of one subsample_group must have in common (the images its subsample is drawn from)
_GROUP_KEYS = ("dataset", "root", "options", "train_size", "test_size", "val_fraction")


def _check_groups(tasks: list[TaskConfig], val_default: float) -> None:
    """Tasks of one ``subsample_group`` draw from the same images: same dataset, root, options, sizes and
    val fraction (a task's own or the ``val_default`` it inherits), and the same kept classes (both all,
    or the same ``classes`` of the same ``label``)."""

    def value(t: TaskConfig, k: str) -> Any:
        v = getattr(t, k)
        return val_default if k == "val_fraction" and v is None else v

    first: dict[str, int] = {}
    for i, t in enumerate(tasks):
        g = t.subsample_group
        if g is None:
            continue
        if g not in first:
            first[g] = i
            continue
        j = first[g]
        ref = tasks[j]
        for k in _GROUP_KEYS:
            if value(t, k) != value(ref, k):
                raise _fail(
                    f"tasks[{i}].{k}: {value(t, k)!r} differs from tasks[{j}]'s {value(ref, k)!r}, and "
                    f"both are in subsample_group '{g}' (a group shares one subsample of one dataset)"
                )
        if (t.classes, t.label) != (ref.classes, ref.label) and not (
            t.classes is None and ref.classes is None
        ):
            raise _fail(
                f"tasks[{i}].classes: subsample_group '{g}' needs the same images in every task: give every "
                f"task of it all classes, or the same classes of the same label (tasks[{j}]: classes "
                f"{ref.classes}, label {ref.label})"
            )


class DataConfig(Strict):
    """``data:``: where the data is, how tasks are sampled, and the tasks (see docs/data.md)."""

    root: str | None = None  # data root; else VIRTNET_DATA_ROOT, ../shared/data, /usr/share/datasets
    sampling: Literal["all", "round_robin", "proportional"] = "all"  # MultiTaskLoader sampling
    # the validation split of every task (and scenario) without a val_fraction of its own; 0: none
    val_fraction: float = Field(default=DEFAULT_VAL_FRACTION, ge=0.0, lt=1.0)
    scenario: ScenarioConfig | None = None  # shorthand expanding to tasks
    tasks: list[TaskConfig] = Field(default_factory=list, validate_default=True)  # explicit tasks

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[TaskConfig], info: ValidationInfo) -> list[TaskConfig]:
        if "scenario" not in info.data:
            return v  # the scenario itself is invalid: that error is reported
        sc: ScenarioConfig | None = info.data["scenario"]
        named = [(n, "scenario") for n in (sc.task_names() if sc is not None else [])]
        named += [(t.task_name, f"tasks[{i}]") for i, t in enumerate(v)]
        if not named:
            raise _fail("no tasks: give data.scenario or data.tasks")
        first: dict[str, str] = {}
        for n, where in named:
            if n in first:
                raise _fail(f"task name '{n}' is used twice ({first[n]} and {where}); set distinct names")
            first[n] = where
        _check_groups(v, info.data.get("val_fraction", DEFAULT_VAL_FRACTION))
        return v

    def task_names(self) -> list[str]:
        """Names of every task, in order (the scenario's first)."""
        return (self.scenario.task_names() if self.scenario else []) + [t.task_name for t in self.tasks]


def build_taskset(cfg: DataConfig, seed: int) -> TaskSet:
    """Load the datasets and build the tasks of a data config.

    Each dataset is loaded once (per root and options) even when several tasks use it. Dataset splits of
    their own (digits, kmnist10k) use fixed seeds; the run ``seed`` drives only ``train_size`` /
    ``test_size`` subsampling and ``val_fraction`` splits.

    A task (or the scenario) without a ``val_fraction`` of its own holds out ``data.val_fraction`` of its
    training images as ``val``; when that default leaves no val or no training image (a tiny task), the
    task gets no val split and a :class:`virtnet.errors.DataWarning` (an explicit ``val_fraction`` that
    cannot be carved is a ConfigError).

    Args:
        cfg: the validated ``data:`` section.
        seed: the run seed.

    Returns:
        The task set: the scenario's tasks first, then ``data.tasks`` in order.

    Raises:
        ConfigError: a problem that depends on the files (e.g. a class a folder dataset does not have),
            naming the key.
        DataError: missing or malformed files.
    """
    cache: dict[tuple[str, str | None, str], DatasetSplits] = {}

    def load(dataset: str, root: str | None, options: dict[str, Any], where: str) -> DatasetSplits:
        key = (dataset, root, json.dumps(options, sort_keys=True, default=str))
        if key not in cache:
            try:
                cache[key] = load_dataset(dataset, root, **options)
            except ConfigError as e:
                raise ConfigError(f"{where}.options: {e}") from None
        return cache[key]

    tasks: list[Task] = []
    sc = cfg.scenario
    if sc is not None:
        common: dict[str, Any] = {
            "train_size": sc.train_size,
            "test_size": sc.test_size,
            "val_fraction": cfg.val_fraction if sc.val_fraction is None else sc.val_fraction,
            "val_default": sc.val_fraction is None,
            "augment": sc.augment.spec(),
            "seed": seed,
            "where": "data.scenario",
        }
        names = sc.task_names()
        root = sc.root or cfg.root
        if sc.kind == "datasets":
            for name in names:
                tasks.append(make_task(name, load(name, root, {}, "data.scenario"), **common))
        else:
            assert sc.dataset is not None
            data = load(sc.dataset, root, sc.options, "data.scenario")
            label = sc.label or "fine"
            if sc.kind == "split_classes":
                n = data.coarse().num_classes if label == "coarse" else data.num_classes
                groups = class_splits(n, sc.num_tasks, sc.splits, data.key, "data.scenario")
                for name, g in zip(names, groups, strict=True):
                    tasks.append(make_task(name, data, label=label, classes=g, **common))
            elif sc.kind == "coarse_fine":
                cf = coarse_fine(data, names=(names[0], names[1]), coarse_map=sc.coarse_map, **common)
                tasks.extend(cf)
            else:
                attrs = _attrs_plain(sc.attributes)
                tasks.append(make_task(names[0], data, label=label, attributes=attrs, **common))
    for i, t in enumerate(cfg.tasks):
        where = f"data.tasks[{i}]"
        data = load(t.dataset, t.root or cfg.root, t.options, where)
        tasks.append(
            make_task(
                t.task_name,
                data,
                label=t.label,
                classes=t.classes,
                label_map=t.label_map,
                attributes=_attrs_plain(t.attributes),
                train_size=t.train_size,
                test_size=t.test_size,
                val_fraction=cfg.val_fraction if t.val_fraction is None else t.val_fraction,
                val_default=t.val_fraction is None,
                augment=t.augment.spec(),
                seed=seed,
                sample_key=None if t.subsample_group is None else f"subsample_group:{t.subsample_group}",
                transforms=[x.spec() for x in t.transforms],
                where=where,
            )
        )
    return TaskSet(tasks, name="+".join(t.name for t in tasks))


__all__ = [
    "DEFAULT_VAL_FRACTION",
    "AttributeConfig",
    "AugmentConfig",
    "DataConfig",
    "ScenarioConfig",
    "TaskConfig",
    "TransformConfig",
    "build_taskset",
]
