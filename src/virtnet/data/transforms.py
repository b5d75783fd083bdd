"""Per-task input transforms: the same images seen differently by each task (domain-incremental sequences).

A transform is fixed when the task is built and applied once to every image of the task's splits (train,
val and test), before the task's normalisation statistics are computed; training augmentation still
happens per batch on top of it. As continual-learning libraries offer:

* ``{"kind": "permute_pixels", "seed": s}``: one fixed permutation of the H x W pixel positions (the same
  for every channel and image), drawn from ``torch.randperm`` with a generator seeded by ``s`` alone (not
  the run seed), so "permuted MNIST" task ``i`` with seed ``i`` is the same in every run;
* ``{"kind": "rotate", "degrees": a, "interpolation": "nearest" | "bilinear"}``: rotation by a fixed
  angle, counter-clockwise for positive ``a`` as displayed (row 0 at the top); multiples of 90 degrees
  are exact (``torch.rot90``: a square image keeps its shape, others swap H and W at odd multiples); other
  angles keep the shape, sample the source pixel (nearest, the default, as torchvision's ``rotate``) or
  interpolate (bilinear), and fill what comes from outside the image with 0.

Several transforms apply in the order given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from virtnet.errors import ConfigError

KINDS = ("permute_pixels", "rotate")
INTERPOLATIONS = ("nearest", "bilinear")


def pixel_permutation(height: int, width: int, seed: int) -> torch.Tensor:
    """The permutation of ``height * width`` pixel positions for ``seed``: ``(H * W,)`` int64."""
    return torch.randperm(height * width, generator=torch.Generator().manual_seed(int(seed)))


def permute_pixels(images: torch.Tensor, seed: int) -> torch.Tensor:
    """``(N, C, H, W)`` images with their pixel positions permuted by :func:`pixel_permutation`: output
    position ``j`` (row-major) holds input position ``perm[j]``."""
    n, c, h, w = images.shape
    perm = pixel_permutation(h, w, seed)
    return images.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w).contiguous()


def rotate(images: torch.Tensor, degrees: float, interpolation: str = "nearest") -> torch.Tensor:
    """``(N, C, H, W)`` uint8 images rotated counter-clockwise by ``degrees`` (see the module docstring)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    quarter = degrees / 90.0
    if quarter == int(quarter):
        return torch.rot90(images, int(quarter) % 4, dims=(-2, -1)).contiguous()
    n, c, h, w = images.shape
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    # grid_sample's grid holds, for every output pixel, the input position (x right, y down, in [-1, 1]);
    # turning the picture counter-clockwise by t as displayed takes output pixel (x, y) from input pixel
    # (cos t x - sin t y, sin t x + cos t y) in pixels (y down), scaled to [-1, 1] per axis
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=torch.float32).unsqueeze(
        0
    )  # (1, 2, 3)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, h, w], align_corners=False)  # (N, H, W, 2)
    out = F.grid_sample(images.float(), grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def check_transforms(specs: Any, key: str) -> list[dict[str, Any]]:
    """Validate a list of transform specs (``key`` prefixes the errors); returns them as plain dicts."""
    if not isinstance(specs, Sequence) or isinstance(specs, str):
        raise ConfigError(f"{key}: expected a list of transforms, got {specs!r}")
    out = []
    for i, spec in enumerate(specs):
        k = f"{key}[{i}]"
        spec = spec.model_dump() if hasattr(spec, "model_dump") else spec
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{k}: expected a mapping with 'kind', got {spec!r}")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{k}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        allowed = {"permute_pixels": {"kind", "seed"}, "rotate": {"kind", "degrees", "interpolation"}}[kind]
        extra = [x for x, v in spec.items() if x not in allowed and v is not None]
        if extra:
            raise ConfigError(f"{k}.{extra[0]}: not used by kind {kind}")
        if kind == "permute_pixels":
            seed = spec.get("seed")
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise ConfigError(f"{k}.seed: kind permute_pixels needs an integer seed >= 0, got {seed!r}")
            out.append({"kind": kind, "seed": seed})
        else:
            deg = spec.get("degrees")
            if isinstance(deg, bool) or not isinstance(deg, int | float) or not math.isfinite(deg):
                raise ConfigError(f"{k}.degrees: kind rotate needs a finite number of degrees, got {deg!r}")
            interp = spec.get("interpolation") or "nearest"
            if interp not in INTERPOLATIONS:
                raise ConfigError(
                    f"{k}.interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {interp!r}"
                )
            out.append({"kind": kind, "degrees": float(deg), "interpolation": interp})
    return out


def apply_transforms(images: torch.Tensor, specs: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """``images`` with every (validated) transform of ``specs`` applied in order."""
    for spec in specs:
        if spec["kind"] == "permute_pixels":
            images = permute_pixels(images, spec["seed"])
        else:
            images = rotate(images, spec["degrees"], spec.get("interpolation") or "nearest")
    return images


__all__ = [
    "INTERPOLATIONS",
    "KINDS",
    "apply_transforms",
    "check_transforms",
    "permute_pixels",
    "pixel_permutation",
    "rotate",
]
