"""``train:`` section of a run config. Numbers are strict (``epochs: true`` or ``1e30`` are errors, see
:class:`virtnet.schema.StrictNumbers`) and bounded (``epochs`` at most 10**6, ``batch_size`` at most
2**20)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from virtnet.schema import Strict

MAX_EPOCHS = 1_000_000
"""The most epochs per phase a config may ask for."""
MAX_BATCH = 1 << 20
"""The largest batch size (per task and step)."""


class TrainConfig(Strict):
    """Options of the training loop (shared by every method)."""

    epochs: int = Field(default=10, ge=1, le=MAX_EPOCHS)  # epochs per phase
    batch_size: int = Field(default=64, ge=1, le=MAX_BATCH)  # per task and step
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # SGD only
    nesterov: bool = True  # SGD only (DVN trains with Nesterov momentum 0.9)
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])  # step: fractions of the phase
    gamma: float = Field(default=0.1, gt=0, le=1)  # step: lr factor at each milestone
    warmup_epochs: float = Field(default=0.0, ge=0)  # linear warm-up at the start of each phase
    clip_grad_norm: float | None = Field(default=None, gt=0)
    # a step whose loss is NaN or infinite: "stop" raises TrainingError naming the phase, epoch and step
    # (the checkpoints written so far are kept); "warn" logs the first one of each phase, writes a
    # "nonfinite" record to metrics.jsonl and goes on (the weights are then usually NaN)
    nonfinite_loss: Literal["stop", "warn"] = "stop"
    # torch intra-op threads; None: the rule of virtnet.threads (idle usable cores, or $VIRTNET_THREADS)
    threads: int | None = Field(default=None, ge=1, le=1024)
    deterministic: bool = True  # torch.use_deterministic_algorithms while training
    progress: bool = True  # progress bars on a terminal
    log_every: int = Field(default=20, ge=1)  # steps between metric lines in metrics.jsonl
    eval_every: int = Field(default=1, ge=0)  # epochs between evaluations, and after the last (0: none)
    checkpoint_every: int = Field(default=1, ge=0)  # epochs between checkpoints (0: only at the end)
    checkpoint_every_steps: int = Field(default=0, ge=0)  # additionally every N steps (0: off)
    max_steps_per_epoch: int | None = Field(default=None, ge=1)  # cap (quick runs and tests)
    # where the model trains: "cpu" or "cuda" (refused when no CUDA device is visible); under torchrun
    # each process uses cuda:LOCAL_RANK. See README "Multi-process and multi-machine training".
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for m in self.milestones:
            if not 0 < m < 1:
                raise ValueError(f"milestones are fractions of a phase in (0, 1), got {m}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        return self
