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
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from virtnet.cost.flops import eval_mode, example_input, run_forward
from virtnet.errors import ConfigError

FORMATS = ("nchw", "channels_last")

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


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


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
        "warmup", "repeats"}`` (plus ``"times_ms"`` when asked).
    """
    fmt = _torch_format(memory_format)
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")
    x = example_input(module, input_shape, batch_size)
    if x.dim() == 4:
        x = x.contiguous(memory_format=fmt)
    times: list[float] = []
    with num_threads(threads), eval_mode(module), as_memory_format(module, memory_format):
        with torch.inference_mode():
            for _ in range(warmup):
                run_forward(module, x)
            _sync(x)
            for _ in range(repeats):
                t0 = time.perf_counter()
                module(x)
                _sync(x)
                times.append((time.perf_counter() - t0) * 1000.0)
        used_threads = torch.get_num_threads()
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
    }
    if keep_times:
        out["times_ms"] = times
    return out


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
        ``{"threads", "warmup", "repeats", "batches": {batch_size: {fmt: measure_latency(...) for each
        format, "best_format": fmt, "best_ms": median of the faster format}}}``.
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
        batches[b] = entry
    return {
        "threads": threads if threads is not None else torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "batches": batches,
    }


__all__ = ["FORMATS", "as_memory_format", "latency_profile", "measure_latency", "num_threads"]
