"""The one training loop every method uses.

Methods plug in through hooks (see :class:`virtnet.methods.base.Method`): ``phases`` (which tasks are
trained together, in what order), ``training_step`` (the losses), ``param_groups`` (what the optimizer
may move), ``after_step`` (e.g. restore frozen weights) and ``on_phase_start``/``on_phase_end``.

Determinism: the model is built under ``torch.manual_seed(seed)``; the data order and augmentation of
every step are functions of ``(seed, phase, epoch, step)`` (see ``MultiTaskLoader``); the global torch RNG
(dropout) is re-seeded at the start of every epoch and saved in mid-epoch checkpoints. Same seed, same
weights on the CPU; and a run resumed from its last checkpoint ends with the same weights as one that
was never stopped.

Resume contract for methods: ``on_phase_start`` always sees the weights its phase started with, also on
resume (the loop reloads them from ``checkpoints/start`` or ``checkpoints/phase-<k-1>`` first), so a
method may derive training-time state from them (a teacher snapshot for distillation) and keep it outside
the model. State that must survive the phase (masks, ownership maps) lives in the model's state dict.
On a mid-phase resume the mid-phase weights are loaded after ``on_phase_start``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from virtnet.data.core import TaskSet
from virtnet.data.loader import MultiTaskLoader
from virtnet.errors import TrainingError
from virtnet.train.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    load_model_state,
    optimizer_from_flat,
    save_checkpoint,
)
from virtnet.train.config import TrainConfig
from virtnet.train.evaluate import evaluate
from virtnet.train.optim import lr_factor, make_optimizer, set_lr

EPOCH_STRIDE = 100_000  # loader "epoch" key = phase * EPOCH_STRIDE + epoch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


@dataclass
class LoopState:
    """Where training stands: the next step to run is ``step`` of ``epoch`` of ``phase``."""

    phase: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0


class Trainer:
    """Runs a method's phases over a task set.

    Args:
        method: a :class:`virtnet.methods.base.Method`.
        model: the method's model (built for every task of the run).
        taskset: the tasks' data.
        cfg: the ``train:`` options.
        seed: the run's seed.
        out_dir: where ``metrics.jsonl``, ``checkpoints/`` and ``model.*`` go (None: write nothing).
        meta: metadata stored in every checkpoint (config, task specs, method options).
        sampling: the loader's sampling (``all``, ``round_robin`` or ``proportional``).
        log: where console lines go.
    """

    def __init__(
        self,
        method: Any,
        model: nn.Module,
        taskset: TaskSet,
        cfg: TrainConfig,
        seed: int = 0,
        out_dir: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        sampling: str = "all",
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.method = method
        self.model = model
        self.taskset = taskset
        self.cfg = cfg
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.meta = dict(meta or {})
        self.sampling = sampling
        self.log = log or (lambda s: print(s, flush=True))
        self.state = LoopState()
        self.epoch_seconds: list[float] = []
        self.history: list[dict[str, Any]] = []

    # ---- files -------------------------------------------------------------------------------------
    @property
    def last_checkpoint(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoints" / "last"

    def _write_metrics(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def _save(self, path: Path, optimizer: torch.optim.Optimizer | None, rng: bool) -> None:
        meta = dict(self.meta)
        meta.update(seed=self.seed, state=asdict(self.state), optimizer_phase=self.state.phase)
        save_checkpoint(
            path,
            self.model.state_dict(),
            meta,
            optimizer=optimizer,
            rng_state=torch.get_rng_state() if rng else None,
        )

    # ---- training ----------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train every phase (from the last checkpoint when ``resume``); returns a summary."""
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        prev_det = torch.are_deterministic_algorithms_enabled()
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit(resume)
        finally:
            torch.use_deterministic_algorithms(prev_det)

    def _fit(self, resume: bool) -> dict[str, Any]:
        phases = self.method.phases(self.taskset.names)
        for ph in phases:  # for options that depend on the data's size (e.g. adapters' weight decay by size)
            ph.info.setdefault("train_sizes", {t: len(self.taskset[t].train) for t in ph.tasks})
        ckpt = None
        if (
            resume
            and self.last_checkpoint is not None
            and checkpoint_paths(self.last_checkpoint)[1].is_file()
        ):
            ckpt = load_checkpoint(self.last_checkpoint)
            self.state = LoopState(**ckpt.meta["state"])
            self.log(
                f"resuming from {checkpoint_paths(self.last_checkpoint)[1]} "
                f"(phase {self.state.phase}, epoch {self.state.epoch}, step {self.state.step})"
            )
            if self.state.epoch == 0 and self.state.step == 0:  # at a phase boundary
                load_model_state(self.model, ckpt.model_state, str(ckpt.path))
                ckpt = None
            else:  # mid-phase: first the weights the phase started with, for on_phase_start
                k = self.state.phase
                start = self.out_dir / "checkpoints" / ("start" if k == 0 else f"phase-{k - 1}")  # type: ignore[operator]
                first = load_checkpoint(start)
                load_model_state(self.model, first.model_state, str(first.path))
        elif self.out_dir is not None:
            self._save(self.out_dir / "checkpoints" / "start", None, rng=False)
        for phase in phases[self.state.phase :]:
            self._run_phase(phase, ckpt)
            ckpt = None
        summary = {
            "global_step": self.state.global_step,
            "epoch_seconds": self.epoch_seconds,
            "history": self.history,
        }
        if self.out_dir is not None:
            self._save(self.out_dir / "model", None, rng=False)
        return summary

    def _nonfinite(self, phase: Any, epoch: int, step: int, loss: torch.Tensor, warned: bool) -> None:
        """A NaN or infinite loss: stop (TrainingError) or, with ``nonfinite_loss: warn``, record it."""
        where = f"phase {phase.name}, epoch {epoch + 1}, step {step + 1}"
        value = float(loss.detach().float().sum())
        record = {"event": "nonfinite", "phase": phase.name, "epoch": epoch, "step": step + 1}
        if self.cfg.nonfinite_loss == "stop":
            self._write_metrics({**record, "stopped": True})
            raise TrainingError(
                f"{where}: the loss is {value} (training diverged); lower train.lr, set "
                "train.clip_grad_norm, or set train.nonfinite_loss: warn to go on"
            )
        if not warned:
            self._write_metrics(record)
            self.log(f"[{phase.name}] warning: {where}: the loss is {value}; going on (nonfinite_loss: warn)")

    def _run_phase(self, phase: Any, ckpt: Any) -> None:
        cfg = self.cfg
        model = self.model
        self.method.on_phase_start(model, phase)
        if ckpt is not None:  # mid-phase resume: weights over what on_phase_start made
            load_model_state(model, ckpt.model_state, str(ckpt.path))
        loader = MultiTaskLoader(
            self.taskset, cfg.batch_size, self.seed, sampling=self.sampling, augment=True, tasks=phase.tasks
        )
        steps = loader.steps_per_epoch()
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, cfg.max_steps_per_epoch)
        epochs = int(phase.info.get("epochs", cfg.epochs))  # a phase may override the epochs and lr
        base_lr = float(phase.info.get("lr", cfg.lr))
        sched = cfg  # ... and the schedule (e.g. PackNet's re-training at a constant rate)
        if "schedule" in phase.info:
            sched = cfg.model_copy(update={"schedule": phase.info["schedule"], "warmup_epochs": 0.0})
        total = steps * epochs
        opt = make_optimizer(self.method.param_groups(model, phase), cfg)
        if ckpt is not None and ckpt.meta.get("optimizer_phase") == phase.index and "optimizer" in ckpt.meta:
            optimizer_from_flat(opt, ckpt.optim_tensors, ckpt.meta["optimizer"])
        params = [p for g in opt.param_groups for p in g["params"]]
        show = cfg.progress and sys.stderr.isatty()
        warned = False  # nonfinite_loss: warn logs the first non-finite loss of a phase
        for epoch in range(self.state.epoch, epochs):
            start_step = self.state.step if epoch == self.state.epoch else 0
            if start_step > 0 and ckpt is not None and ckpt.rng_state is not None:
                torch.set_rng_state(ckpt.rng_state)
            else:
                torch.manual_seed(derive_seed(self.seed, phase.index, epoch))
            model.train()
            t0 = time.perf_counter()
            running: dict[str, torch.Tensor] = {}
            count = 0
            bar = tqdm(
                total=steps,
                initial=start_step,
                disable=not show,
                leave=False,
                desc=f"{phase.name} {epoch + 1}/{epochs}",
                mininterval=0.5,
            )
            it = loader.iterate(phase.index * EPOCH_STRIDE + epoch, start_step=start_step)
            for step in range(start_step, steps):
                batches = next(it)
                set_lr(opt, base_lr, lr_factor(sched, epoch * steps + step, total, steps))
                out = self.method.training_step(model, batches, phase)
                if not torch.isfinite(out["loss"]).all():
                    self._nonfinite(phase, epoch, step, out["loss"], warned)
                    warned = True
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                if cfg.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
                opt.step()
                self.method.after_step(model, phase)
                self.state.global_step += 1
                for k, v in out.items():
                    v = v.detach()
                    running[k] = running[k] + v if k in running else v
                count += 1
                bar.update(1)
                if count == cfg.log_every or step == steps - 1:
                    rec = {
                        "event": "train",
                        "phase": phase.name,
                        "epoch": epoch,
                        "step": step + 1,
                        "global_step": self.state.global_step,
                        "lr": opt.param_groups[0]["lr"],
                    }
                    rec.update({k: float(v) / count for k, v in running.items()})
                    self._write_metrics(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
                    running, count = {}, 0
                if (
                    cfg.checkpoint_every_steps
                    and self.state.global_step % cfg.checkpoint_every_steps == 0
                    and step < steps - 1
                    and self.out_dir is not None
                ):
                    self.state.epoch, self.state.step = epoch, step + 1
                    self._save(self.last_checkpoint, opt, rng=True)  # type: ignore[arg-type]
            bar.close()
            seconds = time.perf_counter() - t0
            self.epoch_seconds.append(seconds)
            self.state.epoch, self.state.step = epoch + 1, 0
            line = f"[{phase.name}] epoch {epoch + 1}/{epochs}: {seconds:.1f}s"
            last = epoch == epochs - 1
            if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
                split = "val" if all(self.taskset[t].val is not None for t in phase.tasks) else "test"
                rows = evaluate(self.method, model, self.taskset, split=split, tasks=phase.tasks)
                self._write_metrics(
                    {
                        "event": "eval",
                        "phase": phase.name,
                        "epoch": epoch + 1,
                        "global_step": self.state.global_step,
                        "seconds": seconds,
                        "rows": rows,
                    }
                )
                line += "  " + "  ".join(f"{r['task']}@{r['level']}: {r['accuracy']:.2f}%" for r in rows)
                line += f" ({split})"
            self.log(line)
            if (
                self.out_dir is not None
                and not last
                and cfg.checkpoint_every
                and (epoch + 1) % cfg.checkpoint_every == 0
            ):
                self._save(self.last_checkpoint, opt, rng=False)  # type: ignore[arg-type]
        self.method.on_phase_end(model, phase)
        self.state = LoopState(phase.index + 1, 0, 0, self.state.global_step)
        if self.out_dir is not None:
            self._save(self.last_checkpoint, None, rng=False)  # type: ignore[arg-type]
            # one checkpoint per phase: the model as it was after learning this phase's tasks
            self._save(self.out_dir / "checkpoints" / f"phase-{phase.index}", None, rng=False)
