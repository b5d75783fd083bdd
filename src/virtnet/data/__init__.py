"""Datasets, tasks and multi-task batches.

- :mod:`virtnet.data.core`: :class:`ArrayDataset`, :class:`Task`, :class:`TaskSet`, :class:`Batch`,
  :class:`AugmentSpec`;
- :mod:`virtnet.data.datasets`: loaders of dataset files (never downloading) and the :data:`DATASETS`
  registry;
- :mod:`virtnet.data.roots`: where dataset files are looked for;
- :mod:`virtnet.data.scenarios`: datasets -> task sets (class splits, several datasets, coarse/fine,
  attributes);
- :mod:`virtnet.data.config`: the ``data:`` config section and :func:`build_taskset`;
- :mod:`virtnet.data.loader`: deterministic resumable batches (:class:`MultiTaskLoader`,
  :func:`eval_batches`);
- :mod:`virtnet.data.augment`: batched crop/flip/normalise.

See docs/data.md.
"""

from virtnet.data.augment import augment_batch, crop_at, hflip_where, normalize, random_crop, random_hflip
from virtnet.data.config import (
    AttributeConfig,
    AugmentConfig,
    DataConfig,
    ScenarioConfig,
    TaskConfig,
    TransformConfig,
    build_taskset,
)
from virtnet.data.core import ArrayDataset, AugmentSpec, Batch, Task, TaskSet
from virtnet.data.datasets import (
    DATASETS,
    FASHION_MNIST_COARSE,
    DatasetSpec,
    DatasetSplits,
    get_dataset_spec,
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
    register_dataset,
)
from virtnet.data.loader import SAMPLINGS, MultiTaskLoader, eval_batches
from virtnet.data.roots import candidate_roots, resolve_data_root
from virtnet.data.scenarios import (
    attribute_task,
    channel_stats,
    coarse_fine,
    datasets_as_tasks,
    make_task,
    split_classes,
    stratified_take,
)
from virtnet.data.transforms import (
    apply_transforms,
    colorize,
    permute_pixels,
    pixel_permutation,
    resize,
    rotate,
    set_channels,
)

__all__ = [
    "DATASETS",
    "FASHION_MNIST_COARSE",
    "SAMPLINGS",
    "ArrayDataset",
    "AttributeConfig",
    "AugmentConfig",
    "AugmentSpec",
    "Batch",
    "DataConfig",
    "DatasetSpec",
    "DatasetSplits",
    "MultiTaskLoader",
    "ScenarioConfig",
    "Task",
    "TaskConfig",
    "TaskSet",
    "TransformConfig",
    "apply_transforms",
    "attribute_task",
    "augment_batch",
    "build_taskset",
    "candidate_roots",
    "channel_stats",
    "coarse_fine",
    "colorize",
    "crop_at",
    "datasets_as_tasks",
    "eval_batches",
    "get_dataset_spec",
    "hflip_where",
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
    "make_task",
    "normalize",
    "permute_pixels",
    "pixel_permutation",
    "random_crop",
    "random_hflip",
    "read_idx",
    "register_dataset",
    "resize",
    "resolve_data_root",
    "rotate",
    "set_channels",
    "split_classes",
    "stratified_take",
]
