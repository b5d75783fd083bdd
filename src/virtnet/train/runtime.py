"""Where a training process runs: its device, its rank among the processes, and the collectives.

One process (the default) is rank 0 of a world of size 1 and needs no process group. Under ``torchrun``
(``WORLD_SIZE`` > 1 in the environment) :meth:`Runtime.from_env` joins the process group (gloo on the CPU,
nccl on CUDA) from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); a process group that is already initialised (tests, a user's own launcher) is used as it
is. The training loop asks the runtime, never the environment:

* ``is_main``: rank 0 writes ``metrics.jsonl``, checkpoints and the final model; the others wait at a
  :meth:`Runtime.barrier` where a later read needs a file;
* :meth:`Runtime.mean`: metrics are the mean of the ranks' values;
* :meth:`Runtime.average_buffers`: the ranks' floating-point buffers (BatchNorm running statistics)
  replaced by their mean, so every rank holds one model (exact when the ranks' buffers are equal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from virtnet.errors import ConfigError


@dataclass
class Runtime:
    """Device and place among the processes of a training run.

    Attributes:
        device: where the model and the batches live.
        rank: this process's rank (0 .. world_size - 1).
        world_size: number of processes training together.
        local_rank: rank on this machine (picks the CUDA device).
        distributed: a process group is in use (the loop then wraps its step module in DDP, also at
            world size 1).
        owns_group: this runtime initialised the process group (and :meth:`close` destroys it).
    """

    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> Runtime:
        """The runtime of this process: torchrun's environment, an initialised process group, or one
        process. ``device``: ``cpu`` or ``cuda`` (refused when CUDA is not available)."""
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"train.device: expected 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' was asked for but this torch sees no CUDA device")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_available() or not dist.is_initialized():
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world <= 1:
                return cls(_device(device, local_rank), 0, 1, local_rank)
            if device == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="env://")
            owns = True
        backend = dist.get_backend()
        if device == "cpu" and backend == "nccl":
            raise ConfigError("train.device: 'cpu' with an nccl process group (use gloo, or device: cuda)")
        return cls(
            _device(device, local_rank), dist.get_rank(), dist.get_world_size(), local_rank, True, owns
        )

    # ---- collectives (no-ops in one process) -----------------------------------------------------
    def barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of every value (same keys on every rank, in the same order)."""
        if not (self.distributed and self.world_size > 1) or not values:
            return values
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self._comm)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(values, t.tolist(), strict=True)}

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag True on every rank when it is True on at least one (one collective for all)."""
        if not (self.distributed and self.world_size > 1):
            return tuple(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self._comm)
        dist.all_reduce(t)
        return tuple(bool(v > 0) for v in t.tolist())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable value, e.g. evaluation rows)."""
        if not (self.distributed and self.world_size > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_buffers(self, model: nn.Module) -> None:
        """Replace every floating-point buffer by its mean over the ranks.

        Computed as ``b0 + sum_r (b_r - b0) / W`` with ``b0`` rank 0's value, so buffers that are already
        equal on every rank (masks, or statistics of frozen layers) stay bit-identical."""
        if not (self.distributed and self.world_size > 1):
            return
        for b in model.buffers():
            if not b.is_floating_point():
                continue
            x = b.detach().to(self._comm)
            b0 = x.clone()
            dist.broadcast(b0, src=0)
            diff = x - b0
            dist.all_reduce(diff)
            b.copy_((b0 + diff / self.world_size).to(b.device))

    def close(self) -> None:
        """Destroy the process group when this runtime created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def _comm(self) -> torch.device:
        """Where collective tensors live: the CUDA device for nccl, the CPU for gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _device(device: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")


__all__ = ["Runtime"]
