"""The ``adapters`` method: series or parallel residual adapters on a frozen universal network.

Rebuffi, Bilen and Vedaldi, "Efficient parametrization of multi-domain deep neural networks", CVPR 2018
(and "Learning multiple visual domains with residual adapters", NIPS 2017). Sketch::

    build    the universal network of init_from (stem, trunk), every chosen convolution wrapped in an
             adapter per domain (alpha_t = 0: every domain starts as the universal network), every batch
             norm made per domain (copies of the pretrained one), a head per domain
    phase    adapt-<t>, one per domain: train alpha_t, domain t's batch norms and head on t's data, with
             weight decay by t's training-set size; the universal weights are in no optimizer group
    phase    compress-<t> (compression svd / svd_single): at the first one, per layer the SVD of the
             stacked alpha_t gives beta (shared) and gamma_t; then each gamma_t is fine-tuned on t
             (compress_tune: domain: with t's batch norms and head; compress_epochs / compress_lr)
    deploy   level 1 of domain t = t's network; export() fuses its adapters into the kernels
"""

from __future__ import annotations

import statistics
from typing import Any

from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.methods.adapters.compression import compress_adapters
from virtnet.methods.adapters.config import AdaptersConfig
from virtnet.methods.adapters.model import AdapterNet, build_adapter_net
from virtnet.methods.adapters.score import decathlon_score
from virtnet.methods.base import Level, Method, Phase, register


@register
class Adapters(Method):
    """Series or parallel residual adapters, one set per domain, on frozen universal weights."""

    name = "adapters"
    Config = AdaptersConfig
    Model = AdapterNet
    export_fuses = True
    config: AdaptersConfig

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        return build_adapter_net(specs, backbone, self.config)

    # ---- training ----------------------------------------------------------------------------------
    def phases(self, tasks: list[str]) -> list[Phase]:
        """``adapt-<t>`` for every domain, then (with compression) ``compress-<t>`` for every domain."""
        out = [Phase(f"adapt-{t}", [t], i, {"step": "adapt"}) for i, t in enumerate(tasks)]
        if self.config.compression != "none":
            n, cfg = len(out), self.config
            extra = {"epochs": cfg.compress_epochs, "lr": cfg.compress_lr}
            extra = {k: v for k, v in extra.items() if v is not None}  # else train.epochs / train.lr
            out += [
                Phase(f"compress-{t}", [t], n + i, {"step": "compress", "decompose": i == 0, **extra})
                for i, t in enumerate(tasks)
            ]
        return out

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        """At the first compression phase, replace every layer's adapters by their SVD factors."""
        if phase.info.get("decompose"):
            compress_adapters(model)

    def param_groups(self, model: nn.Module, phase: Phase) -> list[dict[str, Any]]:
        """Adapt phase: the domain's adapters, batch norms, head (and own stem). Compression phase: its
        ``gamma_t`` (and ``beta_t`` for single-domain factors), with ``compress_tune: domain`` also its
        batch norms, head and own stem. One group, with the domain's weight decay; the universal weights
        (and the shared ``beta``) are in no group, so neither momentum nor weight decay can move them."""
        assert isinstance(model, AdapterNet)
        domain = phase.tasks[0]
        sizes = phase.info.get("train_sizes") or {}
        decay = self.config.decay_for(domain, sizes.get(domain))
        rest = phase.info.get("step", "adapt") == "adapt" or self.config.compress_tune == "domain"
        return [{"params": model.domain_parameters(domain, adapters=True, rest=rest), "weight_decay": decay}]

    # ---- inference ---------------------------------------------------------------------------------
    def levels(self, model: nn.Module, task: str) -> list[Level]:
        """One level per domain: the domain's network."""
        return [Level(1, "adapted", model.route(task, 1))]  # type: ignore[operator]

    def export(self, model: nn.Module, task: str, level: int | None = None) -> nn.Module:
        """The domain's standalone network with its adapters fused into the kernels (plain layers)."""
        assert isinstance(model, AdapterNet)
        self.level(model, task, level)
        return model.fused_network(task)

    def shared_prefixes(self) -> tuple[str, ...]:
        """None: an exported (fused) network's weights are all its domain's own; the sharing of the
        universal weights is reported by :meth:`summary`."""
        return ()

    def summary(self, model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean accuracy over the domains, the decathlon score (with ``score_baseline``), and the
        parameters of every domain's deployment relative to one network."""
        assert isinstance(model, AdapterNet)
        acc = {r["task"]: r["accuracy"] for r in rows if r.get("accuracy") is not None}
        counts = model.parameter_counts()
        out: dict[str, Any] = {
            "domains": len(acc),
            "mean accuracy (%)": round(statistics.fmean(acc.values()), 2) if acc else None,
        }
        base = self.config.score_baseline
        if base and acc and all(d in base for d in acc):
            score = decathlon_score({d: 100.0 - a for d, a in acc.items()}, base)
            out["decathlon score"] = round(score.total, 1)
        else:
            out["decathlon score"] = "- (set method.score_baseline: {domain: baseline test error %})"
        out["parameters (universal)"] = counts["universal"]
        if counts["shared_adapters"]:
            out["parameters (shared adapter factors)"] = counts["shared_adapters"]
        out["parameters (per domain)"] = counts["per_domain"]
        out["parameters (total)"] = counts["total"]
        out["parameters relative to one network"] = round(counts["relative"], 3)
        return out


__all__ = ["Adapters"]
