"""Cross-domain adapter compression (Rebuffi et al., CVPR 2018, Sec. 3.4).

Sketch, per adapted layer with adapters ``alpha_1 ... alpha_T`` (each ``C x C``)::

    [alpha_1 ... alpha_T] = U S V^T                    (C x T C), keep the top K singular values
    beta = U_K S_K  (C x K, shared by the domains),    gamma_t = V_t^T  (C x K, the rows of V of domain t)
    alpha_t ~ beta gamma_t^T;  then fine-tune each gamma_t on domain t with beta fixed

Parameters: ``(T C K + C K) / (T C^2) -> K / C`` for many domains (K = C/2 by default: about half).
Single-domain low rank factors each ``alpha_t = beta_t gamma_t^T`` alone (``2 K / C`` of the parameters,
both factors fine-tuned). The factors live in each layer's :class:`~virtnet.nn.adapters.AdapterBank`.
"""

from __future__ import annotations

from fractions import Fraction

from torch import nn

from virtnet.errors import ConfigError
from virtnet.nn.adapters import AdapterBank


def compress_adapters(model: nn.Module) -> int:
    """Replace the full-rank adapters of every bank built with a rank by their low-rank factors
    (:meth:`AdapterBank.compress`); banks without a rank keep theirs.

    Returns the number of banks compressed. ConfigError when no bank has a rank.
    """
    banks = [m for m in model.modules() if isinstance(m, AdapterBank) and m.rank is not None]
    if not banks:
        raise ConfigError(
            "compression needs adapter banks built with a rank (method.compression: svd or svd_single)"
        )
    for b in banks:
        b.compress()
    return len(banks)


def joint_fraction(domains: int, channels: int, rank: int) -> Fraction:
    """``(T C K + C K) / (T C^2)``: the joint factors' parameters over the full adapters' (square layers)."""
    t, c, k = domains, channels, rank
    return Fraction(t * c * k + c * k, t * c * c)


def single_fraction(channels: int, rank: int) -> Fraction:
    """``2 K / C``: single-domain factors' parameters over the full adapter's (square layers)."""
    return Fraction(2 * rank, channels)


__all__ = ["compress_adapters", "joint_fraction", "single_fraction"]
