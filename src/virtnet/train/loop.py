"""The one training loop every method uses, in one process or data-parallel over several.

Methods plug in through hooks (see :class:`virtnet.methods.base.Method`): ``next_phase`` (which tasks are
trained together, decided one phase at a time; by default the list ``phases`` gives), ``training_step``
(the losses), ``optimizers`` (one or several, by default one over ``param_groups``), ``after_step`` (e.g.
restore frozen weights), ``on_step_end`` (with a :class:`TrainContext`: e.g. grow the model and ask for the
optimizers to be rebuilt) and ``on_phase_start``/``on_phase_end``.

A step: the batches of every rank's shard (see :class:`MultiTaskLoader`) go through the step module
(:class:`virtnet.train.step.StepModule`, wrapped in ``DistributedDataParallel`` when a process group is in
use), the loss is backpropagated, every optimizer of the phase steps, and the hooks run on the unwrapped
model. Parameters that no optimizer of the phase holds are frozen for the phase. The rules for several
processes (sharding, BatchNorm statistics, ``find_unused_parameters``) are in :mod:`virtnet.train.step`
and the README's "Multi-process and multi-machine training".

Determinism: the model is built under ``torch.manual_seed(seed)``; the data order and augmentation of
every step are functions of ``(seed, phase, epoch, step)`` (and of the rank's place, for its shard); the
global torch RNG (dropout) is re-seeded at the start of every epoch (rank ``r`` > 0 with ``r`` mixed in)
and saved in mid-epoch checkpoints (every rank's). Same seed, same weights on the CPU; and a run resumed
from its last checkpoint ends with the same weights as one that was never stopped.

Resume contract for methods: ``on_phase_start`` always sees the weights its phase started with, also on
resume (the loop reloads them from ``checkpoints/start`` or ``checkpoints/phase-<k-1>`` first), so a
method may derive training-time state from them (a teacher snapshot for distillation) and keep it outside
the model. State that must survive the phase (masks, ownership maps) lives in the model's state dict.
On a mid-phase resume the mid-phase weights are loaded after ``on_phase_start``. The phases decided so
far (``meta["phases"]``) and one record per finished epoch (``meta["history"]``, what ``next_phase``
decides from) are in every checkpoint: a resumed run replays those decisions rather than deciding again.

Files: rank 0 alone writes ``metrics.jsonl`` and the checkpoints; metrics are the mean over ranks.
SIGTERM during :meth:`Trainer.fit` ends the current step, writes ``checkpoints/last`` (resumable with
``--resume``) and then takes its usual course.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
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
from virtnet.errors import ConfigError, TrainingError
from virtnet.methods.base import Phase, TrainContext
from virtnet.train.checkpoint import (
    Checkpoint,
    checkpoint_paths,
    clean_stale_temp,
    load_checkpoint,
    load_checkpoint_with_fallback,
    load_model_state,
    previous_stem,
    save_checkpoint,
)
from virtnet.train.config import TrainConfig
from virtnet.train.evaluate import evaluate
from virtnet.train.optim import lr_factor, set_lr
from virtnet.train.runtime import Runtime
from virtnet.train.step import (
    PhaseOptimizer,
    StepModule,
    build_optimizers,
    carry_state,
    find_unused,
    freeze_unheld,
    optimizers_state,
    phase_from_dict,
    phase_to_dict,
    restore_optimizers,
    to_device,
    unfreeze,
    wrap,
)

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


def load_saved(model: nn.Module, ckpt: Checkpoint) -> None:
    """Make ``model`` the one ``ckpt`` saved: its structure first (a topology that changed during
    training, e.g. a widened tree), then its tensors."""
    structure = ckpt.meta.get("structure")
    if structure is not None:
        model.apply_structure(structure)  # type: ignore[operator]
    load_model_state(model, ckpt.model_state, str(ckpt.path))


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
        log: where console lines go (rank 0's only).
        runtime: device and rank (None: :meth:`Runtime.from_env` with ``cfg.device``).

    Raises:
        ConfigError: a world size that does not divide ``cfg.batch_size``, or a method whose training
            cannot run data-parallel under a world size above 1.
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
        runtime: Runtime | None = None,
    ) -> None:
        self.runtime = runtime if runtime is not None else Runtime.from_env(cfg.device)
        self.method = method
        self.model = model
        self.taskset = taskset
        self.cfg = cfg
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.meta = dict(meta or {})
        self.sampling = sampling
        log = log or (lambda s: print(s, flush=True))
        self.log = log if self.runtime.is_main else (lambda s: None)
        self.state = LoopState()
        self.epoch_seconds: list[float] = []
        self.history: list[dict[str, Any]] = []  # every metrics record of this process
        self.phases: list[Phase] = []  # decided so far (checkpointed)
        self.epoch_records: list[dict[str, Any]] = []  # one per finished epoch: what next_phase sees
        self._check_world()
        self.model.to(self.runtime.device)
        self.step_module = StepModule(model, method)
        self._stop = False  # set by SIGTERM

    def _check_world(self) -> None:
        w = self.runtime.world_size
        if w == 1:
            return
        if self.cfg.batch_size % w:
            raise ConfigError(
                f"train.batch_size: {self.cfg.batch_size} (the global batch per task) does not divide among "
                f"{w} processes; use a multiple of {w}"
            )
        if not getattr(self.method, "data_parallel", True):
            raise ConfigError(
                f"method '{self.method.name}': its training cannot run data-parallel; "
                f"train it in one process (world size {w} asked for)"
            )

    # ---- files (rank 0) ------------------------------------------------------------------------------
    @property
    def last_checkpoint(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoints" / "last"

    def _write_metrics(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is None or not self.runtime.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def _save(self, path: Path, optimizers: dict[str, PhaseOptimizer] | None, rng: bool) -> None:
        """Rank 0 writes the checkpoint ``path`` (every rank calls: mid-epoch RNG states are gathered)."""
        rng_state = self._rng_states() if rng else None
        if not self.runtime.is_main:
            return
        meta = dict(self.meta)
        meta.update(seed=self.seed, state=asdict(self.state), optimizer_phase=self.state.phase)
        meta.update(phases=[phase_to_dict(p) for p in self.phases], history=self.epoch_records)
        meta["structure"] = self.model.structure()  # what a rebuild needs (the model protocol)
        save_checkpoint(
            path,
            self.model.state_dict(),
            meta,
            optimizer=optimizers_state(optimizers) if optimizers else None,
            rng_state=rng_state,
            keep_previous=path == self.last_checkpoint,
        )

    def _rng_states(self) -> torch.Tensor:
        """This rank's torch RNG state; with several ranks, every rank's, concatenated in rank order."""
        own = torch.get_rng_state()
        if self.runtime.world_size == 1:
            return own
        import torch.distributed as dist

        comm = self.runtime._comm  # the CUDA device under nccl
        parts = [torch.empty_like(own, device=comm) for _ in range(self.runtime.world_size)]
        dist.all_gather(parts, own.to(comm))
        return torch.cat([p.cpu() for p in parts])

    def _set_rng(self, saved: torch.Tensor | None, phase: Phase, epoch: int) -> None:
        own = torch.get_rng_state()
        n, r = own.numel(), self.runtime.rank
        if saved is not None and saved.numel() >= n * (r + 1) and saved.numel() % n == 0:
            torch.set_rng_state(saved[r * n : (r + 1) * n].clone())
        else:
            self._seed_epoch(phase, epoch)

    def _seed_epoch(self, phase: Phase, epoch: int) -> None:
        r = self.runtime.rank
        extra = (r,) if r > 0 else ()  # rank 0 (and one process) as before
        torch.manual_seed(derive_seed(self.seed, phase.index, epoch, *extra))

    # ---- training ----------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train every phase (from the last checkpoint when ``resume``); returns a summary."""
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        prev_det = torch.are_deterministic_algorithms_enabled()
        if self.cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        prev_term = self._saved_term = self._install_sigterm()
        try:
            return self._fit(resume)
        finally:
            torch.use_deterministic_algorithms(prev_det)
            if prev_term is not None:
                signal.signal(signal.SIGTERM, prev_term)
            self.runtime.close()

    def _install_sigterm(self) -> Any:
        """SIGTERM: finish the step, checkpoint, then die as before (main thread only; else None)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        prev = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            self._stop = True

        signal.signal(signal.SIGTERM, handler)
        return prev if prev is not None else signal.SIG_DFL

    def _terminated(self, prev: Any) -> None:
        """After the SIGTERM checkpoint: the signal's usual course."""
        self.log("SIGTERM: wrote checkpoints/last; resume with --resume")
        signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)
        if callable(prev):
            prev(signal.SIGTERM, None)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
        raise TrainingError("terminated by SIGTERM (checkpoints/last written)")

    def _fit(self, resume: bool) -> dict[str, Any]:
        resumed, ckpt = self._resume() if resume else (False, None)
        if not resumed and self.out_dir is not None:
            self._save(self.out_dir / "checkpoints" / "start", None, rng=False)
        while (phase := self._phase(self.state.phase)) is not None:
            self._run_phase(phase, ckpt)
            ckpt = None
        summary = {
            "global_step": self.state.global_step,
            "epoch_seconds": self.epoch_seconds,
            "history": self.history,
            "phases": [phase_to_dict(p) for p in self.phases],
        }
        if self.out_dir is not None:
            self._save(self.out_dir / "model", None, rng=False)
        self.runtime.barrier()  # the files exist for every rank once fit returns
        return summary

    def _resume(self) -> tuple[bool, Checkpoint | None]:
        """Load the last checkpoint: ``(resumed, the checkpoint when mid-phase)``; restores the loop's
        state, the decided phases and the epoch records."""
        last = self.last_checkpoint
        if last is None or not any(checkpoint_paths(s)[1].is_file() for s in (last, previous_stem(last))):
            return False, None
        if self.runtime.is_main:
            for p in clean_stale_temp(last.parent):
                self.log(f"removed the stale temporary file {p}")
        self.runtime.barrier()
        ckpt = load_checkpoint_with_fallback(last)
        if ckpt.notice:
            self.log(ckpt.notice)
        self.state = LoopState(**ckpt.meta["state"])
        self.phases = [phase_from_dict(d) for d in ckpt.meta.get("phases", [])]
        self.epoch_records = list(ckpt.meta.get("history", []))
        self.log(
            f"resuming from {ckpt.path} "
            f"(phase {self.state.phase}, epoch {self.state.epoch}, step {self.state.step})"
        )
        if self.state.epoch == 0 and self.state.step == 0:  # at a phase boundary
            load_saved(self.model, ckpt)
            return True, None
        k = self.state.phase  # mid-phase: first the weights the phase started with, for on_phase_start
        start = last.parent / ("start" if k == 0 else f"phase-{k - 1}")
        load_saved(self.model, load_checkpoint(start))
        return True, ckpt

    def _phase(self, k: int) -> Phase | None:
        """Phase ``k``: replayed when already decided (also from a checkpoint), else asked of the method."""
        if k < len(self.phases):
            return self.phases[k]
        phase = self.method.next_phase(self.taskset.names, list(self.phases), list(self.epoch_records))
        if phase is None:
            return None
        phase.index = k
        # for options that depend on the data's size (e.g. adapters' weight decay by size)
        phase.info.setdefault("train_sizes", {t: len(self.taskset[t].train) for t in phase.tasks})
        self.phases.append(phase)
        return phase

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

    # ---- one phase -----------------------------------------------------------------------------------
    def _run_phase(self, phase: Phase, ckpt: Checkpoint | None) -> None:
        cfg, rt, model = self.cfg, self.runtime, self.model
        self.method.on_phase_start(model, phase)
        if ckpt is not None:  # mid-phase resume: weights (and structure) over what on_phase_start made
            load_saved(model, ckpt)
        loader = MultiTaskLoader(
            self.taskset,
            cfg.batch_size,
            self.seed,
            sampling=self.sampling,
            augment=True,
            tasks=phase.tasks,
            rank=rt.rank,
            world_size=rt.world_size,
        )
        steps = loader.steps_per_epoch()
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, cfg.max_steps_per_epoch)
        epochs = int(phase.info.get("epochs", cfg.epochs))  # a phase may override the epochs and lr
        forward_only = bool(phase.info.get("forward_only", False))  # a statistics phase: no optimizer
        self._opts = {} if forward_only else build_optimizers(self.method, model, phase, cfg)
        if ckpt is not None and ckpt.meta.get("optimizer_phase") == phase.index and "optimizer" in ckpt.meta:
            restore_optimizers(self._opts, ckpt.optim_tensors, ckpt.meta["optimizer"])
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._frozen = freeze_unheld(model, self._opts)
        self._unused = find_unused(self.method, phase, self.sampling)
        # no gradient to synchronise in a statistics phase: its buffers are averaged at its end
        self._net = self.step_module if forward_only else wrap(self.step_module, rt, self._unused)
        self._warned = False  # nonfinite_loss: warn logs the first non-finite loss of a phase
        try:
            for epoch in range(self.state.epoch, epochs):
                self._run_epoch(phase, loader, epoch, epochs, steps, ckpt)
        finally:
            unfreeze(self._frozen)
            self._net = self.step_module
        if forward_only:
            rt.average_buffers(model)
        self.method.on_phase_end(model, phase)
        self.state = LoopState(phase.index + 1, 0, 0, self.state.global_step)
        if self.out_dir is not None:
            self._save(self.last_checkpoint, None, rng=False)  # type: ignore[arg-type]
            # one checkpoint per phase: the model as it was after learning this phase's tasks
            self._save(self.out_dir / "checkpoints" / f"phase-{phase.index}", None, rng=False)

    def _rebuild(self, phase: Phase, state_from: dict[str, str]) -> None:
        """The method changed the parameter set: new optimizers (state carried by name), freezing and DDP."""
        unfreeze(self._frozen)
        new = build_optimizers(self.method, self.model, phase, self.cfg)
        carry_state(self._opts, new, self.model, state_from, self._names)
        self._opts = new
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self._frozen = freeze_unheld(self.model, new)
        self._net = wrap(self.step_module, self.runtime, self._unused)

    def _run_epoch(
        self,
        phase: Phase,
        loader: MultiTaskLoader,
        epoch: int,
        epochs: int,
        steps: int,
        ckpt: Checkpoint | None,
    ) -> None:
        cfg = self.cfg
        start_step = self.state.step if epoch == self.state.epoch else 0
        if start_step > 0 and ckpt is not None and ckpt.rng_state is not None:
            self._set_rng(ckpt.rng_state, phase, epoch)
        else:
            self._seed_epoch(phase, epoch)
        self.model.train()
        t0 = time.perf_counter()
        running: dict[str, torch.Tensor] = {}
        count = 0
        last_train: dict[str, Any] = {}
        show = cfg.progress and sys.stderr.isatty() and self.runtime.is_main
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
            out = self._train_step(
                phase, to_device(next(it), self.runtime.device), epoch, step, steps, epochs
            )
            self.state.global_step += 1
            for k, v in out.items():
                v = v.detach()
                running[k] = running[k] + v if k in running else v
            count += 1
            bar.update(1)
            if count == cfg.log_every or step == steps - 1:
                last_train = self._log_train(phase, epoch, step, running, count)
                bar.set_postfix(loss=f"{last_train['loss']:.3f}")
                running, count = {}, 0
            every = cfg.checkpoint_every_steps
            stop = self._stop_now()
            if (every and self.state.global_step % every == 0 and step < steps - 1 or stop) and self.out_dir:
                self.state.epoch, self.state.step = epoch, step + 1
                self.runtime.average_buffers(self.model)
                self._save(self.last_checkpoint, self._opts, rng=True)  # type: ignore[arg-type]
            if stop:
                bar.close()
                self.runtime.barrier()
                self._terminated(self._saved_term)
        bar.close()
        self._end_epoch(phase, epoch, epochs, time.perf_counter() - t0, last_train)

    def _stop_now(self) -> bool:
        """SIGTERM seen on any rank (checked on every rank at every step when there are several)."""
        if self.runtime.world_size == 1:
            return self._stop
        return self.runtime.any(self._stop)[0]

    def _train_step(
        self, phase: Phase, batches: dict[str, Any], epoch: int, step: int, steps: int, epochs: int
    ) -> dict[str, torch.Tensor]:
        """One step: forward through the step module, backward, every optimizer, then the hooks."""
        if not self._opts:  # a statistics phase (``forward_only``): no autograd, no backward, no step
            with torch.no_grad():
                out = self._net(batches, phase)
            self.method.after_step(self.model, phase)
            ctx = TrainContext(
                phase, epoch, step, self.state.global_step + 1, {}, self.runtime.rank, self.runtime.world_size
            )
            self.method.on_step_end(self.model, phase, ctx)
            return out
        for po in self._opts.values():
            set_lr(po.opt, po.base_lr, lr_factor(po.sched, epoch * steps + step, steps * epochs, steps))
        out = self._net(batches, phase)
        bad = not bool(torch.isfinite(out["loss"]).all())
        if self.runtime.world_size > 1:
            (bad,) = self.runtime.any(bad)
        if bad:
            self._nonfinite(phase, epoch, step, out["loss"], self._warned)
            self._warned = True
        for po in self._opts.values():
            po.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.cfg.clip_grad_norm is not None:
            params = [p for po in self._opts.values() for p in po.params]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
        for po in self._opts.values():
            po.opt.step()
        self.method.after_step(self.model, phase)
        ctx = TrainContext(
            phase,
            epoch,
            step,
            self.state.global_step + 1,
            {n: po.opt for n, po in self._opts.items()},
            self.runtime.rank,
            self.runtime.world_size,
        )
        self.method.on_step_end(self.model, phase, ctx)
        if ctx.rebuild_request is not None:
            self._rebuild(phase, ctx.rebuild_request)
        return out

    def _log_train(
        self, phase: Phase, epoch: int, step: int, running: dict[str, torch.Tensor], count: int
    ) -> dict[str, Any]:
        first = next(iter(self._opts.values())).opt if self._opts else None
        rec = {
            "event": "train",
            "phase": phase.name,
            "epoch": epoch,
            "step": step + 1,
            "global_step": self.state.global_step,
            "lr": None if first is None else first.param_groups[0]["lr"],
        }
        rec.update(self.runtime.mean({k: float(v) / count for k, v in running.items()}))
        self._write_metrics(rec)
        return rec

    def _end_epoch(
        self, phase: Phase, epoch: int, epochs: int, seconds: float, last_train: dict[str, Any]
    ) -> None:
        """Average the ranks' buffers, evaluate (rank 0), record the epoch, checkpoint."""
        cfg = self.cfg
        self.runtime.average_buffers(self.model)
        self.epoch_seconds.append(seconds)
        self.state.epoch, self.state.step = epoch + 1, 0
        line = f"[{phase.name}] epoch {epoch + 1}/{epochs}: {seconds:.1f}s"
        last = epoch == epochs - 1
        rows = None
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or last):
            split = "val" if all(self.taskset[t].val is not None for t in phase.tasks) else "test"
            rows = None
            if self.runtime.is_main:  # the other ranks hold the same model: they receive rank 0's rows
                rows = evaluate(self.method, self.model, self.taskset, split=split, tasks=phase.tasks)
            rows = self.runtime.broadcast(rows)
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
        train = {k: v for k, v in last_train.items() if k.startswith("loss")}
        step = self.state.global_step
        self.epoch_records.append(
            {"phase": phase.name, "epoch": epoch + 1, "global_step": step, "train": train, "eval": rows}
        )
        self.log(line)
        if (
            self.out_dir is not None
            and not last
            and cfg.checkpoint_every
            and (epoch + 1) % cfg.checkpoint_every == 0
        ):
            self._save(self.last_checkpoint, self._opts, rng=False)  # type: ignore[arg-type]
