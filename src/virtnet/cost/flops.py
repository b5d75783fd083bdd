"""FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode counts a multiply-add as **2 FLOPs** (a convolution is ``2 * Cin/groups * Cout * k*k *
Ho*Wo`` per sample, a linear layer ``2 * in * out``); it counts matrix products and convolutions only, so
biases, batch norm, activations and pooling add nothing. Reports label the column "FLOPs (2 per MAC)".
The count scales linearly with the batch size; reports give it for one sample (``batch_size=1``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from virtnet.errors import ConfigError, DataError


def _check_shape(input_shape: Sequence[int], batch_size: int) -> tuple[int, ...]:
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    shape = tuple(input_shape)
    if not shape or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
        raise ConfigError(
            f"input_shape must be positive integers (C, H, W) without the batch, got {input_shape!r}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return shape


def example_input(module: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    """A deterministic random batch ``(batch_size, *input_shape)`` on the module's device and float dtype."""
    shape = _check_shape(input_shape, batch_size)
    device, dtype = torch.device("cpu"), torch.get_default_dtype()
    for t in list(module.parameters()) + list(module.buffers()):
        device = t.device
        if t.is_floating_point():
            dtype = t.dtype
            break
    g = torch.Generator().manual_seed(0)
    return torch.randn((batch_size, *shape), generator=g, dtype=dtype).to(device)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode and restore every submodule's own training flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def run_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a failure becomes a one-line :class:`DataError` naming the input shape."""
    try:
        return module(x)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = type(module).__name__
        raise DataError(f"{name} failed on an input of shape {tuple(x.shape)}: {first}") from e


def flop_counts(module: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> dict[str, int]:
    """FLOPs (2 per MAC) of one forward pass per aten operator, e.g. ``{"aten.convolution": ...}``."""
    x = example_input(module, input_shape, batch_size)
    counter = FlopCounterMode(display=False)
    with eval_mode(module), torch.no_grad(), counter:
        run_forward(module, x)
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(module: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> int:
    """FLOPs of one forward pass of ``module`` on a batch of ``batch_size`` inputs of ``input_shape``.

    Counted with ``FlopCounterMode`` in eval mode under ``torch.no_grad`` (a multiply-add is 2 FLOPs; only
    matrix products and convolutions count). The module's training flags are restored afterwards.

    Args:
        module: the network; called as ``module(x)``.
        input_shape: one input's shape without the batch, e.g. ``(3, 32, 32)``.
        batch_size: inputs per batch.
    """
    x = example_input(module, input_shape, batch_size)
    counter = FlopCounterMode(display=False)
    with eval_mode(module), torch.no_grad(), counter:
        run_forward(module, x)
    return int(counter.get_total_flops())


__all__ = ["count_flops", "eval_mode", "example_input", "flop_counts"]
