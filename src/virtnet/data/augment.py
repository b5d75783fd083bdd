"""Batched augmentation and normalisation of image tensors on the CPU.

Every function works on a whole batch ``(B, C, H, W)`` at once (no per-sample Python loop). Random
functions draw from an explicit ``torch.Generator`` in a documented order, so a batch's augmentation is
reproducible from the generator's seed alone:

- :func:`random_crop` draws the row offsets ``(B,)`` then the column offsets ``(B,)``, each uniform in
  ``0 .. 2 * padding`` (``torch.randint``), and calls :func:`crop_at`;
- :func:`random_hflip` draws ``torch.rand(B)`` and flips the samples where it is ``< 0.5``
  (:func:`hflip_where`);
- :func:`augment_batch` crops first (when ``crop_padding > 0``), then flips (when ``hflip``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from virtnet.data.core import AugmentSpec
from virtnet.errors import DataError


def _check_batch(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise DataError(f"{what}: expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")


def crop_at(x: torch.Tensor, padding: int, offset_y: torch.Tensor, offset_x: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` pixels on every side, then crop each sample at its own offset.

    Sample ``b`` of the result is ``padded[b, :, oy:oy + H, ox:ox + W]`` with ``oy = offset_y[b]`` and
    ``ox = offset_x[b]`` in ``0 .. 2 * padding`` (offset ``padding`` returns the image unchanged).

    Args:
        x: ``(B, C, H, W)`` images.
        padding: zero padding in pixels (>= 0).
        offset_y: ``(B,)`` integer row offsets into the padded image.
        offset_x: ``(B,)`` integer column offsets.

    Returns:
        ``(B, C, H, W)`` crops, same dtype as ``x``.
    """
    _check_batch(x, "crop_at")
    if padding < 0:
        raise DataError(f"crop_at: padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    oy = torch.as_tensor(offset_y, dtype=torch.long)
    ox = torch.as_tensor(offset_x, dtype=torch.long)
    if oy.shape != (b,) or ox.shape != (b,):
        raise DataError(
            f"crop_at: offsets must have shape ({b},), got {tuple(oy.shape)} and {tuple(ox.shape)}"
        )
    if b and (
        int(oy.min()) < 0 or int(ox.min()) < 0 or int(oy.max()) > 2 * padding or int(ox.max()) > 2 * padding
    ):
        raise DataError(f"crop_at: offsets must be in 0..{2 * padding}")
    if padding == 0:
        return x.clone()
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    rows = oy[:, None] + torch.arange(h)  # (B, H)
    cols = ox[:, None] + torch.arange(w)  # (B, W)
    bi = torch.arange(b)[:, None, None, None]  # (B, 1, 1, 1)
    ci = torch.arange(c)[None, :, None, None]  # (1, C, 1, 1)
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the original size after zero padding by ``padding`` pixels, per sample.

    Draws ``offset_y = randint(0, 2p + 1, (B,))`` then ``offset_x`` likewise from ``generator`` and
    returns :func:`crop_at` ``(x, padding, offset_y, offset_x)``.

    Args:
        x: ``(B, C, H, W)`` images.
        padding: zero padding in pixels (0 returns a copy of ``x``).
        generator: source of randomness.

    Returns:
        ``(B, C, H, W)`` crops.
    """
    _check_batch(x, "random_crop")
    if padding == 0:
        return x.clone()
    b = x.shape[0]
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)  # (B,)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)  # (B,)
    return crop_at(x, padding, oy, ox)


def hflip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples where ``flip`` ``(B,)`` bool is True."""
    _check_batch(x, "hflip_where")
    flip = torch.as_tensor(flip, dtype=torch.bool)
    if flip.shape != (x.shape[0],):
        raise DataError(f"hflip_where: flip must have shape ({x.shape[0]},), got {tuple(flip.shape)}")
    return torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each sample left-right with probability 1/2 (where ``torch.rand(B) < 0.5``)."""
    _check_batch(x, "random_hflip")
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # (B,)
    return hflip_where(x, flip)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean[c]) / std[c]`` per channel.

    Args:
        x: ``(B, C, H, W)`` float images.
        mean: C per-channel means.
        std: C per-channel standard deviations (non-zero).

    Returns:
        ``(B, C, H, W)`` float32.
    """
    _check_batch(x, "normalize")
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise DataError(
            f"normalize: images have {c} channels but mean/std have {len(mean)}/{len(std)} values"
        )
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, c, 1, 1)
    return (x.float() - m) / s  # (B, C, H, W)


def augment_batch(
    x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply a task's training augmentation: random crop (when ``crop_padding > 0``), then random flip.

    Args:
        x: ``(B, C, H, W)`` images.
        spec: the task's augmentation.
        generator: source of randomness (crop offsets are drawn before flip coins).

    Returns:
        ``(B, C, H, W)`` augmented images (``x`` itself when the spec does nothing).
    """
    if spec.crop_padding > 0:
        x = random_crop(x, spec.crop_padding, generator)
    if spec.hflip:
        x = random_hflip(x, generator)
    return x


__all__ = ["augment_batch", "crop_at", "hflip_where", "normalize", "random_crop", "random_hflip"]
