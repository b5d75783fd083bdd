"""The one training loop, optimisers, schedules, checkpoints and evaluation."""

from virtnet.train.checkpoint import (
    Checkpoint,
    checkpoint_paths,
    load_checkpoint,
    load_model_state,
    read_meta,
    save_checkpoint,
)
from virtnet.train.config import TrainConfig
from virtnet.train.evaluate import accuracy_counts, evaluate
from virtnet.train.loop import LoopState, Trainer, derive_seed
from virtnet.train.optim import lr_factor, make_optimizer, set_lr

__all__ = [
    "Checkpoint",
    "LoopState",
    "TrainConfig",
    "Trainer",
    "accuracy_counts",
    "checkpoint_paths",
    "derive_seed",
    "evaluate",
    "load_checkpoint",
    "load_model_state",
    "lr_factor",
    "make_optimizer",
    "read_meta",
    "save_checkpoint",
    "set_lr",
]
