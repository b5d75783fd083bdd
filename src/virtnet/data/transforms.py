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
  interpolate (bilinear), and fill what comes from outside the image with 0;
* ``{"kind": "resize", "size": n}``: bilinear resize to ``n x n`` (``F.interpolate``, ``align_corners=False``,
  antialiased when either side shrinks), rounded back to uint8; a task of another input size, e.g. MNIST
  at 32 x 32 next to 8 x 8 digits (Deep Elastic Networks' mixed-input scenario);
* ``{"kind": "channels", "count": 1 | 3, "mode": "replicate" | "colorize", "seed": s}``: the task's
  channel count. ``count: 1`` makes gray images (3 channels: ITU-R 601 luma ``0.299 R + 0.587 G + 0.114
  B``, rounded; 1 channel: unchanged). ``count: 3`` with ``mode: replicate`` (the default) copies a gray
  channel three times (3-channel images stay as they are); with ``mode: colorize`` (``seed`` required) every
  image gets its own fixed random foreground and background colour, as in coloured-MNIST variants:
  ``out_c = bg_c + (fg_c - bg_c) * gray / 255`` with ``fg_c ~ U[0.6, 1]`` and ``bg_c ~ U[0, 0.4]`` (x 255,
  per channel, rounded), so the three channels differ and the stroke stays brighter than the background
  in each. The colours of the images of a split are drawn in order from a generator seeded by
  :func:`colour_seed` ``(seed, split)``: they depend on the transform's seed, the split and the image's
  position in the split, not on the run seed.

Several transforms apply in the order given. Channel counts other than 1 and 3 are refused by
``channels``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from virtnet.errors import ConfigError

KINDS = ("permute_pixels", "rotate", "resize", "channels")
INTERPOLATIONS = ("nearest", "bilinear")
CHANNEL_COUNTS = (1, 3)
CHANNEL_MODES = ("replicate", "colorize")
LUMA = (0.299, 0.587, 0.114)
"""ITU-R 601 luma weights of R, G, B (``count: 1`` of a 3-channel image; ``colorize`` of one)."""
FOREGROUND = (0.6, 1.0)
"""``colorize``: the range of a foreground colour component (on [0, 1])."""
BACKGROUND = (0.0, 0.4)
"""``colorize``: the range of a background colour component (on [0, 1])."""
_CHUNK = 4096  # images per float block of resize / colorize (bounds their float copies)


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


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 images resized bilinearly to ``(N, C, size, size)`` (antialiased when either
    side shrinks, ``align_corners=False``), rounded to uint8. Images already of that size are returned
    as they are."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    antialias = size < h or size < w
    out = torch.empty((n, c, size, size), dtype=torch.uint8)
    for i in range(0, n, _CHUNK):
        x = images[i : i + _CHUNK].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        out[i : i + _CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` uint8 gray images: 1 channel as it is, 3 channels by :data:`LUMA` (rounded)."""
    c = images.shape[1]
    if c == 1:
        return images
    if c != 3:
        raise ValueError(f"expected images of 1 or 3 channels, got {c}")
    w = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.uint8)
    for i in range(0, images.shape[0], _CHUNK):
        y = (images[i : i + _CHUNK].float() * w).sum(1, keepdim=True)
        out[i : i + _CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def colour_seed(seed: int, split: str = "") -> int:
    """The seed of the colour generator of ``colorize`` for a split: a 63-bit hash of ``("colorize", seed,
    split)`` (the same as :func:`virtnet.data.scenarios.derive_seed` of those parts)."""
    text = "\x1f".join(str(p) for p in ("colorize", int(seed), split)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") & ((1 << 63) - 1)


def image_colours(n: int, seed: int, split: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``(foreground, background)`` colours of ``n`` images for ``colorize``: two ``(n, 3)`` float tensors
    on [0, 255], foreground components in :data:`FOREGROUND`, background in :data:`BACKGROUND` (x 255).
    Image ``i`` gets row ``i``; the first rows do not depend on ``n``."""
    g = torch.Generator().manual_seed(colour_seed(seed, split))
    u = torch.rand((n, 2, 3), generator=g, dtype=torch.float64)  # per image: fg then bg
    fg = FOREGROUND[0] + (FOREGROUND[1] - FOREGROUND[0]) * u[:, 0]
    bg = BACKGROUND[0] + (BACKGROUND[1] - BACKGROUND[0]) * u[:, 1]
    return (fg * 255).float(), (bg * 255).float()


def colorize(images: torch.Tensor, seed: int, split: str = "") -> torch.Tensor:
    """``(N, 3, H, W)`` uint8: every (gray, :func:`to_gray`) image drawn in its own foreground colour on its
    own background colour, ``bg + (fg - bg) * gray / 255`` per channel (:func:`image_colours`)."""
    gray = to_gray(images)
    n = gray.shape[0]
    fg, bg = image_colours(n, seed, split)
    out = torch.empty((n, 3, *gray.shape[2:]), dtype=torch.uint8)
    for i in range(0, n, _CHUNK):
        x = gray[i : i + _CHUNK].float() / 255.0  # (b, 1, H, W)
        f = fg[i : i + _CHUNK].view(-1, 3, 1, 1)
        b = bg[i : i + _CHUNK].view(-1, 3, 1, 1)
        out[i : i + _CHUNK] = (b + (f - b) * x).round_().clamp_(0, 255).to(torch.uint8)
    return out


def set_channels(
    images: torch.Tensor, count: int, mode: str = "replicate", seed: int | None = None, split: str = ""
) -> torch.Tensor:
    """``images`` with ``count`` channels (see the module docstring): ``count`` 1 (gray) or 3
    (``mode`` ``replicate`` or ``colorize``, the latter seeded by ``seed``)."""
    if count not in CHANNEL_COUNTS or isinstance(count, bool):
        raise ValueError(f"count must be 1 or 3, got {count!r}")
    if mode not in CHANNEL_MODES:
        raise ValueError(f"mode must be one of {CHANNEL_MODES}, got {mode!r}")
    c = images.shape[1]
    if c not in CHANNEL_COUNTS:
        raise ValueError(f"expected images of 1 or 3 channels, got {c}")
    if count == 1:
        if mode != "replicate":
            raise ValueError(f"mode {mode} needs count 3")
        return to_gray(images)
    if mode == "colorize":
        if seed is None:
            raise ValueError("mode colorize needs a seed")
        return colorize(images, seed, split)
    return images if c == 3 else images.expand(-1, 3, -1, -1).contiguous()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        allowed = {
            "permute_pixels": {"kind", "seed"},
            "rotate": {"kind", "degrees", "interpolation"},
            "resize": {"kind", "size"},
            "channels": {"kind", "count", "mode", "seed"},
        }[kind]
        extra = [x for x, v in spec.items() if x not in allowed and v is not None]
        if extra:
            raise ConfigError(f"{k}.{extra[0]}: not used by kind {kind}")
        if kind == "permute_pixels":
            seed = spec.get("seed")
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise ConfigError(f"{k}.seed: kind permute_pixels needs an integer seed >= 0, got {seed!r}")
            out.append({"kind": kind, "seed": seed})
        elif kind == "resize":
            size = spec.get("size")
            if not _is_int(size) or size < 1:
                raise ConfigError(f"{k}.size: kind resize needs an integer size >= 1, got {size!r}")
            out.append({"kind": kind, "size": size})
        elif kind == "channels":
            count = spec.get("count")
            if not _is_int(count) or count not in CHANNEL_COUNTS:
                raise ConfigError(f"{k}.count: kind channels needs count 1 or 3, got {count!r}")
            mode = spec.get("mode") or "replicate"
            if mode not in CHANNEL_MODES:
                raise ConfigError(f"{k}.mode: expected one of {', '.join(CHANNEL_MODES)}, got {mode!r}")
            if count == 1 and mode != "replicate":
                raise ConfigError(f"{k}.mode: {mode} needs count 3, got count 1")
            seed = spec.get("seed")
            if mode == "colorize":
                if not _is_int(seed) or not 0 <= seed < 2**63:
                    raise ConfigError(f"{k}.seed: mode colorize needs an integer seed >= 0, got {seed!r}")
                out.append({"kind": kind, "count": count, "mode": mode, "seed": seed})
            else:
                if seed is not None:
                    raise ConfigError(f"{k}.seed: not used by mode {mode} (used by: colorize)")
                out.append({"kind": kind, "count": count, "mode": mode})
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


def apply_transforms(
    images: torch.Tensor, specs: Sequence[Mapping[str, Any]], *, split: str = "", where: str = "transforms"
) -> torch.Tensor:
    """``images`` with every (validated) transform of ``specs`` applied in order.

    Args:
        images: ``(N, C, H, W)`` uint8.
        specs: transforms as :func:`check_transforms` returns them.
        split: the split the images are (``train``, ``val``, ``test``): it seeds ``colorize``'s colours.
        where: the config key of ``specs`` prefixing errors (``<where>[i]``).

    Raises:
        ConfigError: a transform cannot take the images (``channels`` of images with neither 1 nor 3
            channels), naming ``<where>[i]``.
    """
    for i, spec in enumerate(specs):
        kind = spec["kind"]
        if kind == "permute_pixels":
            images = permute_pixels(images, spec["seed"])
        elif kind == "resize":
            images = resize(images, spec["size"])
        elif kind == "channels":
            c = images.shape[1]
            if c not in CHANNEL_COUNTS:
                raise ConfigError(f"{where}[{i}]: kind channels needs images of 1 or 3 channels, got {c}")
            mode = spec.get("mode") or "replicate"
            images = set_channels(images, spec["count"], mode, spec.get("seed"), split)
        else:
            images = rotate(images, spec["degrees"], spec.get("interpolation") or "nearest")
    return images


__all__ = [
    "BACKGROUND",
    "CHANNEL_COUNTS",
    "CHANNEL_MODES",
    "FOREGROUND",
    "INTERPOLATIONS",
    "KINDS",
    "LUMA",
    "apply_transforms",
    "check_transforms",
    "colorize",
    "colour_seed",
    "image_colours",
    "permute_pixels",
    "pixel_permutation",
    "resize",
    "rotate",
    "set_channels",
    "to_gray",
]
