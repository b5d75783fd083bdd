"""PackNet's ownership map: which task first used each weight, and its packed storage.

Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning", CVPR 2018,
Sec. 3: "If a parameter is first used by Task K, it is used by all tasks K, ..., N ... we need at most
log2(N) bits to encode the mask per parameter". Here every prunable weight has an owner in ``0..N``
(0 = free, ``t`` = owned by task ``t``); task ``t``'s network is the weights whose owner is in ``1..t``.

In memory the map is one ``uint8`` buffer per prunable weight tensor (in the model's state dict, so
checkpoints and resume carry it). For storage it is packed with ``ceil(log2(N + 1))`` bits per weight
(:func:`pack_bits` / :func:`unpack_bits`, exact round trip) and written by :func:`save_ownership` as a
safetensors file plus a JSON sidecar naming every layer and shape; :func:`load_ownership` refuses a map
saved for another network with a one-line :class:`~virtnet.errors.CheckpointError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from virtnet.errors import CheckpointError, ConfigError

FORMAT = "virtnet-packnet-ownership"
FORMAT_VERSION = 1
MAX_TASKS = 255  # owners are stored as uint8


def bits_per_weight(num_tasks: int) -> int:
    """Bits that encode an owner in ``0..num_tasks``: ``ceil(log2(num_tasks + 1))``."""
    if num_tasks < 1:
        raise ConfigError(f"PackNet needs at least one task, got {num_tasks}")
    return max(1, math.ceil(math.log2(num_tasks + 1)))


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` values packed with ``bits`` bits each: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into a ``uint8`` tensor, ``bits`` bits each.

    The values are read flat in order; each is written most significant bit first, and bits fill each
    byte from its most significant bit (numpy ``packbits`` order); the last byte is padded with zeros.

    Args:
        values: integer tensor of any shape, each value in ``[0, 2**bits)``.
        bits: bits per value, 1..8.

    Returns:
        ``(ceil(numel * bits / 8),)`` uint8 tensor.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to be packed with {bits} bits")
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64)  # (bits,) MSB first
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (numel * bits,)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int64)
    return (stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values, as a flat ``uint8`` tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(count, bits):
        raise ValueError(
            f"expected {packed_size(count, bits)} packed bytes (uint8, 1-D) for {count} values of "
            f"{bits} bits, got {packed.numel()} ({packed.dtype})"
        )
    shifts = torch.arange(7, -1, -1, dtype=torch.int64)
    stream = ((packed.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[: count * bits]  # (count * bits,)
    weights = 1 << torch.arange(bits - 1, -1, -1, dtype=torch.int64)  # (bits,)
    return (stream.reshape(count, bits) * weights).sum(dim=1).to(torch.uint8)


def buffer_name(param_name: str) -> str:
    """The ownership buffer's name for a parameter name (dots become double underscores)."""
    return param_name.replace(".", "__")


class OwnershipMap(nn.Module):
    """One ``uint8`` owner tensor per prunable weight: 0 = free, ``t`` = first used by task ``t``.

    Args:
        shapes: ``{parameter name: shape}`` of the prunable weights, in the network's order.
        num_tasks: N; owners lie in ``0..N``.
    """

    def __init__(self, shapes: dict[str, torch.Size | tuple[int, ...]], num_tasks: int) -> None:
        super().__init__()
        if num_tasks > MAX_TASKS:
            raise ConfigError(f"PackNet supports at most {MAX_TASKS} tasks (uint8 owners), got {num_tasks}")
        self.num_tasks = num_tasks
        self.bits = bits_per_weight(num_tasks)
        self.names: list[str] = list(shapes)
        for name, shape in shapes.items():
            self.register_buffer(buffer_name(name), torch.zeros(tuple(shape), dtype=torch.uint8))

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, buffer_name(name))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(parameter name, owner tensor)`` pairs in the network's order."""
        for name in self.names:
            yield name, self[name]

    def numel(self) -> int:
        """Number of prunable weights."""
        return sum(t.numel() for _, t in self.items())

    def counts(self) -> dict[int, int]:
        """``{owner: number of weights}`` over every layer (owner 0 = free)."""
        total = torch.zeros(self.num_tasks + 1, dtype=torch.int64)
        for _, t in self.items():
            total += torch.bincount(t.reshape(-1).to(torch.int64), minlength=self.num_tasks + 1)
        return {i: int(v) for i, v in enumerate(total)}

    def packed_bytes(self) -> int:
        """Bytes of the packed map: ``ceil(numel * bits / 8)``."""
        return packed_size(self.numel(), self.bits)

    def pack(self) -> torch.Tensor:
        """The whole map (layers concatenated flat in order) packed with ``bits`` bits per weight."""
        if not self.names:
            return torch.zeros(0, dtype=torch.uint8)
        return pack_bits(torch.cat([t.reshape(-1) for _, t in self.items()]), self.bits)

    def layout(self) -> list[list[Any]]:
        """``[[name, shape], ...]``: what a packed map must have been saved for."""
        return [[name, list(t.shape)] for name, t in self.items()]

    def load_packed(self, packed: torch.Tensor, source: str = "ownership map") -> None:
        """Fill the map from :meth:`pack`'s output (same layers and shapes, in order)."""
        try:
            flat = unpack_bits(packed, self.numel(), self.bits)
        except ValueError as e:
            raise CheckpointError(f"{source}: saved for a different network: {e}") from None
        if flat.numel() and int(flat.max()) > self.num_tasks:
            raise CheckpointError(f"{source}: owner {int(flat.max())} exceeds the {self.num_tasks} tasks")
        start = 0
        with torch.no_grad():
            for _, t in self.items():
                n = t.numel()
                t.copy_(flat[start : start + n].reshape(t.shape))
                start += n


def save_ownership(omap: OwnershipMap, path: str | Path, tasks: list[str] | None = None) -> Path:
    """Write the packed map to ``<path>.safetensors`` and its layout to ``<path>.json``.

    Returns the JSON sidecar's path.
    """
    from virtnet.storage import write_pair

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bits": omap.bits,
        "num_tasks": omap.num_tasks,
        "tasks": list(tasks) if tasks is not None else None,
        "layers": omap.layout(),
    }
    return write_pair(path, {"ownership": omap.pack()}, meta)


def load_ownership(omap: OwnershipMap, path: str | Path, tasks: list[str] | None = None) -> None:
    """Load a map written by :func:`save_ownership` into ``omap``.

    Raises:
        CheckpointError: (one line) the files are missing or altered, or the map was saved for a network
            with other prunable layers, shapes, task count or tasks.
    """
    from virtnet.storage import read_pair_meta

    tpath, jpath, meta = read_pair_meta(path, FORMAT, FORMAT_VERSION, "PackNet ownership map")
    saved = [[str(n), [int(d) for d in s]] for n, s in meta.get("layers", [])]
    own = omap.layout()
    if saved != own:
        names_saved, names_own = [n for n, _ in saved], [n for n, _ in own]
        if names_saved != names_own:
            i = next(
                (i for i, (a, b) in enumerate(zip(names_saved, names_own, strict=False)) if a != b),
                min(len(names_saved), len(names_own)),
            )
            if i == len(names_saved):
                what = f"it has no layer '{names_own[i]}'"
            elif i == len(names_own):
                what = f"it has a layer '{names_saved[i]}' that the model lacks"
            else:
                what = f"layer '{names_saved[i]}' where the model has '{names_own[i]}'"
        else:
            n, s = next((a, b) for a, b in zip(saved, own, strict=True) if a != b)
            what = f"layer '{n[0]}' has shape {tuple(n[1])}, the model's {tuple(s[1])}"
        raise CheckpointError(f"{jpath}: ownership map saved for a different network: {what}")
    if meta.get("num_tasks") != omap.num_tasks or meta.get("bits") != omap.bits:
        raise CheckpointError(
            f"{jpath}: ownership map saved for {meta.get('num_tasks')} tasks, the model has {omap.num_tasks}"
        )
    if tasks is not None and meta.get("tasks") is not None and list(meta["tasks"]) != list(tasks):
        raise CheckpointError(
            f"{jpath}: ownership map saved for tasks {meta['tasks']}, the model has {list(tasks)}"
        )
    try:
        packed = load_file(str(tpath))["ownership"]
    except (SafetensorError, OSError, KeyError) as e:
        raise CheckpointError(f"{tpath}: unreadable ownership map: {e}") from None
    omap.load_packed(packed, str(tpath))


__all__ = [
    "OwnershipMap",
    "bits_per_weight",
    "buffer_name",
    "load_ownership",
    "pack_bits",
    "packed_size",
    "save_ownership",
    "unpack_bits",
]
