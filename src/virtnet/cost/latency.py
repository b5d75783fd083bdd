"""Wall-clock latency of one forward pass.

How it is measured: the module is put in eval mode and run under ``torch.inference_mode`` with a fixed
number of intra-op threads (``torch.set_num_threads``, restored afterwards). Its 4-D weights and the 4-D
input are converted to the requested memory format (``"nchw"``, the contiguous layout, or
``"channels_last"``). After ``warmup`` untimed calls, each of ``repeats`` calls is timed with
``time.perf_counter``; the median is reported with the 10th and 90th percentiles.

On small CPUs the memory format alone changes convolution timings by up to 3x, in either direction
depending on the layer shapes, so :func:`latency_profile` measures every (batch size, format) pair and names
the faster format per batch size; reports use the faster one.

The caller's module is left as it was: the converted weights are swapped in for the measurement and the
original tensors (same memory, same layout) put back afterwards, together with every training flag.

Contention: on a busy machine the figures mean little (two-thread timings beside another busy process
come out 10-50x slower and in no stable order). While timing, every measurement records how long this
process's threads were runnable but waiting for a core (``/proc/self/task/*/schedstat``: run-queue wait
over run + wait time, ``runqueue_wait``) and the main thread's CPU time over the wall time
(``cpu_per_wall``). It is ``contended`` when the run-queue wait exceeds :data:`CONTENDED_WAIT` of the
time, or (where schedstat is unavailable) the main thread ran less than :data:`CONTENDED_CPU` of the wall
time. :func:`latency_profile` reports ``contended`` when any of its measurements was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from virtnet.cost.flops import eval_mode, example_input, run_forward
from virtnet.errors import ConfigError

FORMATS = ("nchw", "channels_last")

CONTENDED_WAIT = 0.10
"""Run-queue wait (fraction of run + wait time) above which a measurement is marked contended."""
CONTENDED_CPU = 0.80
"""Main-thread CPU time over wall time below which a measurement is marked contended (no schedstat)."""

_TORCH_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _torch_format(memory_format: str) -> torch.memory_format:
    if memory_format not in _TORCH_FORMATS:
        raise ConfigError(f"memory_format must be one of {list(FORMATS)}, got {memory_format!r}")
    return _TORCH_FORMATS[memory_format]


@contextmanager
def as_memory_format(module: nn.Module, fmt: str) -> Iterator[nn.Module]:
    """Temporarily lay out the module's 4-D parameters and buffers in memory format ``fmt``.

    Only tensors not already in that layout are copied; the original tensors are put back on exit.
    """
    target = _torch_format(fmt)
    params: list[tuple[nn.Parameter, torch.Tensor]] = []
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for m in module.modules():
                for p in m.parameters(recurse=False):
                    if p.dim() == 4 and not p.is_contiguous(memory_format=target):
                        params.append((p, p.data))
                        p.data = p.data.contiguous(memory_format=target)
                for name, b in list(m._buffers.items()):
                    if b is not None and b.dim() == 4 and not b.is_contiguous(memory_format=target):
                        buffers.append((m, name, b))
                        m._buffers[name] = b.contiguous(memory_format=target)
        yield module
    finally:
        for p, data in params:
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave as is); restore the previous count on exit."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)


def _schedstat() -> tuple[int, int] | None:
    """``(run ns, run-queue wait ns)`` summed over this process's threads; None where unavailable."""
    run = wait = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                fields = f.read().split()
            run += int(fields[0])
            wait += int(fields[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return run, wait


class ContentionProbe:
    """Measures, between :meth:`start` and :meth:`stop`, the run-queue wait and the main thread's CPU time
    against the wall time (see the module docstring)."""

    def start(self) -> None:
        self._sched = _schedstat()
        self._cpu = time.thread_time()
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        cpu = time.thread_time() - self._cpu
        sched = _schedstat()
        out: dict[str, Any] = {"cpu_per_wall": float(cpu / wall) if wall > 0 else 1.0, "runqueue_wait": None}
        if self._sched is not None and sched is not None:
            run, wait = sched[0] - self._sched[0], sched[1] - self._sched[1]
            if run + wait > 0 and run >= 0 and wait >= 0:
                out["runqueue_wait"] = float(wait / (run + wait))
        if out["runqueue_wait"] is not None:
            out["contended"] = bool(out["runqueue_wait"] > CONTENDED_WAIT)
        else:
            out["contended"] = bool(out["cpu_per_wall"] < CONTENDED_CPU)
        return out


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _check_counts(warmup: Any, repeats: Any) -> None:
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")


def measure_latency(
    module: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int | None = 2,
    memory_format: str = "channels_last",
    warmup: int = 5,
    repeats: int = 20,
    keep_times: bool = False,
) -> dict[str, Any]:
    """Time one forward pass of ``module`` on a batch of ``batch_size`` inputs of ``input_shape``.

    Args:
        module: the network; called as ``module(x)``. Left unchanged (layout and training flags).
        input_shape: one input's shape without the batch, e.g. ``(3, 32, 32)``.
        batch_size: inputs per batch.
        threads: intra-op threads while timing (None: the current setting); restored afterwards.
        memory_format: ``"nchw"`` or ``"channels_last"`` (applies to 4-D weights and 4-D inputs only).
        warmup: untimed calls first.
        repeats: timed calls.
        keep_times: also return every call's time as ``times_ms``.

    Returns:
        ``{"median_ms", "p10_ms", "p90_ms", "mean_ms", "batch_size", "memory_format", "threads",
        "warmup", "repeats", "contended", "runqueue_wait", "cpu_per_wall"}`` (plus ``"times_ms"`` when
        asked); ``contended`` is True when other processes kept this one waiting for cores while timing.
    """
    fmt = _torch_format(memory_format)
    _check_counts(warmup, repeats)
    x = example_input(module, input_shape, batch_size)
    if x.dim() == 4:
        x = x.contiguous(memory_format=fmt)
    times: list[float] = []
    with num_threads(threads), eval_mode(module), as_memory_format(module, memory_format):
        with torch.inference_mode():
            for _ in range(warmup):
                run_forward(module, x)
            _sync(x)
            probe = ContentionProbe()
            probe.start()
            for _ in range(repeats):
                t0 = time.perf_counter()
                module(x)
                _sync(x)
                times.append((time.perf_counter() - t0) * 1000.0)
            contention = probe.stop()
        used_threads = torch.get_num_threads()
    if x.is_cuda:  # the host thread sleeps while the device works: CPU time says nothing
        contention = {**contention, "contended": False, "cpu_per_wall": None}
    arr = np.asarray(times)
    out: dict[str, Any] = {
        "median_ms": float(np.median(arr)),
        "p10_ms": float(np.percentile(arr, 10)),
        "p90_ms": float(np.percentile(arr, 90)),
        "mean_ms": float(arr.mean()),
        "batch_size": batch_size,
        "memory_format": memory_format,
        "threads": used_threads,
        "warmup": warmup,
        "repeats": repeats,
        **contention,
    }
    if keep_times:
        out["times_ms"] = times
    return out


def measure_interleaved(
    modules: dict[str, nn.Module],
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int | None = 2,
    memory_format: str = "channels_last",
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, Any]:
    """Time several modules call by call in turn (a b c, then b c a, ...), so that every module sees the
    same machine state: on a shared or frequency-scaling CPU the speed drifts by tens of percent within
    seconds, and two identical networks timed one after the other can come out 1.3x apart; timed in turn
    they agree within about 1 %. Same input, layout and thread handling as :func:`measure_latency`.

    Returns:
        ``{"median_ms": {name: ms}, "ratio": {(a, b): median over calls of time_a / time_b of the same
        turn}, "contended", "runqueue_wait", "cpu_per_wall", "repeats", "memory_format", "threads"}``.
    """
    if not modules:
        raise ConfigError("measure_interleaved needs at least one module")
    _check_counts(warmup, repeats)
    fmt = _torch_format(memory_format)
    names = list(modules)
    first = modules[names[0]]
    x = example_input(first, input_shape, batch_size)
    if x.dim() == 4:
        x = x.contiguous(memory_format=fmt)
    times: dict[str, list[float]] = {n: [] for n in names}
    with ExitStack() as stack:
        stack.enter_context(num_threads(threads))
        for m in modules.values():
            stack.enter_context(eval_mode(m))
            stack.enter_context(as_memory_format(m, memory_format))
        stack.enter_context(torch.inference_mode())
        for _ in range(warmup):
            for n in names:
                run_forward(modules[n], x)
        _sync(x)
        probe = ContentionProbe()
        probe.start()
        for i in range(repeats):
            k = i % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter()
                modules[n](x)
                _sync(x)
                times[n].append((time.perf_counter() - t0) * 1000.0)
        contention = probe.stop()
        used_threads = torch.get_num_threads()
    ratio = {
        (a, b): float(np.median(np.asarray(times[a]) / np.asarray(times[b])))
        for a in names
        for b in names
        if a != b
    }
    return {
        "median_ms": {n: float(np.median(np.asarray(t))) for n, t in times.items()},
        "ratio": ratio,
        "repeats": repeats,
        "memory_format": memory_format,
        "threads": used_threads,
        **contention,
    }


def latency_profile(
    module: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    formats: Sequence[str] = FORMATS,
    threads: int | None = 2,
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, Any]:
    """Latency of every (batch size, memory format) pair, and the faster format per batch size.

    For inputs that are not images (``input_shape`` not ``(C, H, W)``) the layout makes no difference and
    only the first format is measured.

    Returns:
        ``{"threads", "warmup", "repeats", "contended", "runqueue_wait", "batches": {batch_size: {fmt:
        measure_latency(...) for each format, "best_format": fmt, "best_ms": median of the faster format,
        "contended"}}}``; ``contended`` (True when any measurement was) means the figures are not reliable
        (``runqueue_wait``: the largest run-queue wait fraction seen, None where unknown).
    """
    formats = list(dict.fromkeys(formats))
    if not formats:
        raise ConfigError("latency_profile needs at least one memory format")
    for f in formats:
        _torch_format(f)
    if not batch_sizes:
        raise ConfigError("latency_profile needs at least one batch size")
    if len(tuple(input_shape)) != 3:
        formats = formats[:1]
    batches: dict[int, dict[str, Any]] = {}
    for b in batch_sizes:
        entry: dict[str, Any] = {}
        for f in formats:
            entry[f] = measure_latency(module, input_shape, b, threads, f, warmup, repeats)
        best = min(formats, key=lambda f: entry[f]["median_ms"])
        entry["best_format"] = best
        entry["best_ms"] = entry[best]["median_ms"]
        entry["contended"] = any(entry[f]["contended"] for f in formats)
        batches[b] = entry
    waits = [e[f]["runqueue_wait"] for e in batches.values() for f in formats]
    known = [w for w in waits if w is not None]
    return {
        "threads": threads if threads is not None else torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "contended": any(e["contended"] for e in batches.values()),
        "runqueue_wait": max(known) if known else None,
        "batches": batches,
    }


__all__ = [
    "CONTENDED_CPU",
    "CONTENDED_WAIT",
    "FORMATS",
    "ContentionProbe",
    "as_memory_format",
    "latency_profile",
    "measure_interleaved",
    "measure_latency",
    "num_threads",
]
