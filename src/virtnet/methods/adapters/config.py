"""Options of the ``adapters`` method (the ``method:`` section of a run config).

Example::

    method:
      name: adapters
      kind: parallel            # parallel | series
      placement: all            # all | early | mid | late | half
      init_from: runs/source/model.json
      compression: svd          # none | svd (cross-domain) | svd_single (per-domain low rank)
      compress_tune: factors    # compress phases fine-tune gamma_t only (factors) or also BN + head (domain)
      weight_decay: by_size     # the paper's three groups by training-set size; a number; {domain: number}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from virtnet.errors import ConfigError
from virtnet.methods.base import MethodConfig

#: the paper's groups (Sec. 4.1, "Regularization"): weight decay 0.002 for Aircraft, DTD, Flowers (2k-7k
#: training images), 0.0005 for Omniglot, Pedestrians, UCF101 (9k-30k), 0.0001 for CIFAR-100, GTSRB, SVHN
#: (40k-70k). As ``[size bound, decay]``: a domain with fewer training images than the first bound gets
#: the first decay, and so on; the last entry (bound None) takes every larger domain.
PAPER_SIZE_GROUPS: list[tuple[int | None, float]] = [(8000, 0.002), (35000, 0.0005), (None, 0.0001)]


class AdaptersConfig(MethodConfig):
    """Options of :class:`~virtnet.methods.adapters.method.Adapters` (see docs/methods/adapters.md)."""

    kind: Literal["parallel", "series"] = "parallel"  # the adapter topology (Sec. 3.1)
    placement: Literal["all", "early", "mid", "late", "half"] = "all"  # which convolutions (Sec. 3.2)
    layers: list[str] | None = None  # module names / fnmatch patterns to adapt instead of a placement
    init_from: str | None = None  # checkpoint of the universal network (a joint/finetune/individual run)
    source: str | None = None  # task of init_from whose stem is universal (default: its first task)
    compression: Literal["none", "svd", "svd_single"] = "none"  # Sec. 3.4; adds one gamma phase per domain
    svd_rank: int | None = Field(default=None, ge=1)  # K for every layer (default: svd_fraction * C)
    svd_fraction: float = Field(default=0.5, gt=0, le=1)  # K = max(1, round(fraction * C_out))
    # what a compress-<t> phase fine-tunes: "factors" (the paper: gamma_t only, beta_t for svd_single) or
    # "domain" (the factors and domain t's batch norms, head and own stem, as its adapt phase does)
    compress_tune: Literal["factors", "domain"] = "factors"
    compress_epochs: int | None = Field(default=None, ge=1)  # epochs of a compress phase (train.epochs)
    compress_lr: float | None = Field(default=None, gt=0)  # its learning rate (default: train.lr)
    weight_decay: Literal["by_size"] | float | dict[str, float] = "by_size"  # per domain (Sec. 4.1)
    size_groups: list[tuple[int | None, float]] = Field(default_factory=lambda: list(PAPER_SIZE_GROUPS))
    dropout: float = Field(default=0.0, ge=0, lt=1)  # on the input of each block's second adapter
    parallel_impl: Literal["fold", "branch"] = "fold"  # kernel-centre folding or a 1x1 branch
    score_baseline: dict[str, float] | None = None  # baseline test error (%) per domain: decathlon score

    @model_validator(mode="after")
    def _check(self) -> AdaptersConfig:
        if self.svd_rank is not None and self.compression == "none":
            raise ValueError("svd_rank is set but compression is 'none'")
        tuning = self.compress_tune != "factors" or self.compress_epochs or self.compress_lr
        if self.compression == "none" and tuning:
            raise ValueError("compress_tune / _epochs / _lr are set but compression is 'none'")
        if isinstance(self.weight_decay, float) and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if isinstance(self.weight_decay, dict) and any(v < 0 for v in self.weight_decay.values()):
            raise ValueError("weight_decay values must be >= 0")
        groups = self.size_groups
        bounds = [b for b, _ in groups]
        if not groups or bounds[-1] is not None or any(b is None for b in bounds[:-1]):
            raise ValueError("size_groups: [[bound, decay], ..., [null, decay]]: only the last bound is null")
        if any(b2 <= b1 for b1, b2 in zip(bounds[:-2], bounds[1:-1], strict=True)):  # type: ignore[operator]
            raise ValueError("size_groups: bounds must increase")
        if self.score_baseline is not None and any(v <= 0 for v in self.score_baseline.values()):
            raise ValueError("score_baseline: baseline errors must be > 0 (E_max = 2 x error)")
        if self.layers is not None and not self.layers:
            raise ValueError("layers: give at least one name or pattern (or leave it unset)")
        return self

    def rank_for(self, out_channels: int) -> int | None:
        """The rank ``K`` of a layer with ``out_channels`` outputs (None without compression)."""
        if self.compression == "none":
            return None
        if self.svd_rank is not None:
            return self.svd_rank
        return max(1, int(round(self.svd_fraction * out_channels)))

    def decay_for(self, domain: str, train_size: int | None) -> float:
        """The weight decay of ``domain``'s parameters: a number, the domain's entry, or its size group."""
        wd = self.weight_decay
        if isinstance(wd, (int, float)):
            return float(wd)
        if isinstance(wd, dict):
            if domain not in wd:
                raise ConfigError(
                    f"method.weight_decay: no value for domain '{domain}' (given: {sorted(wd)})"
                )
            return float(wd[domain])
        if train_size is None:
            raise ConfigError(
                "method.weight_decay: 'by_size' needs the domain's training-set size "
                "(phase.info['train_sizes'], given by the training loop); set a number or {domain: number}"
            )
        return size_group_decay(train_size, self.size_groups)


def size_group_decay(train_size: int, groups: list[tuple[int | None, float]]) -> float:
    """The decay of the first group whose bound exceeds ``train_size`` (the last group has no bound)."""
    for bound, decay in groups:
        if bound is None or train_size < bound:
            return float(decay)
    return float(groups[-1][1])  # pragma: no cover (the last bound is None)


__all__ = ["AdaptersConfig", "PAPER_SIZE_GROUPS", "size_group_decay"]
