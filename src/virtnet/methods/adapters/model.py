"""The multi-domain network of residual adapters: one universal network, steered per domain.

Rebuffi, Bilen and Vedaldi, "Efficient parametrization of multi-domain deep neural networks", CVPR 2018,
Sec. 3.2 (injection into ResNet-26, placements). Sketch::

    x (domain t) -> resize to the universal input size -> stem -> trunk -> head[t] -> logits
    stem, trunk: the pretrained universal network; every convolution chosen by the placement is wrapped
                 in a series or parallel adapter (alpha_t per domain), every batch norm becomes one
                 batch norm per domain (initialised from the pretrained one); the universal convolution
                 weights are frozen
    placement:   all (every conv with a kernel > 1, the stem's included), early / mid / late (the
                 stem + first / second / third macro-block), half (the second conv of every block)

Domains whose images have the universal input's channels share the universal stem (their images are
resized bilinearly to the universal input size, as the Visual Decathlon resizes every dataset to one
resolution); a domain with other channels gets its own trainable stem, counted as domain-specific.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import Backbone, TaskNet, TaskSpec, check_input_shape, init_weights
from virtnet.backbones.registry import BackboneConfig, build_backbone, default_feature_size
from virtnet.errors import BudgetError, CheckpointError, ConfigError, TaskError
from virtnet.nn import Linear, Route, Routed, call
from virtnet.nn.adapters import (
    AdapterBank,
    AdapterConv,
    DomainBatchNorm,
    SeriesAdapterConv2d,
    adaptable_convs,
    fuse_module,
    inject_adapters,
    rank_limit,
)
from virtnet.protocol import MultiTaskModel, check_structure
from virtnet.train.checkpoint import load_checkpoint

PLACEMENTS = ("all", "early", "mid", "late", "half")


class InputLayer(nn.Module, Routed):
    """Resize ``(B, C, s, s)`` images to ``size x size`` (bilinear; antialiased when shrinking), then run
    ``body`` (the universal stem)."""

    def __init__(self, body: nn.Module, size: int) -> None:
        super().__init__()
        self.body = body
        self.size = size

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            shrink = x.shape[-1] > self.size
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink
            )
        return call(self.body, x, route)  # (B, C, S, S) -> the trunk's input


class AdapterNet(nn.Module, MultiTaskModel):
    """The universal network (stem, trunk) with adapters and per-domain batch norms, and a head per domain.

    Build it with :func:`build_adapter_net`. ``forward(x, task, route=None)``: the domain is ``task``
    (a route, when given, must name it).

    Attributes:
        input: :class:`InputLayer` around the universal stem.
        trunk: the universal trunk (adapters injected).
        own_stems: stems of the domains whose images have other channels than the universal input.
        heads: a linear classifier per domain.
        kind: ``"parallel"`` or ``"series"``.
        adapted: names of the wrapped convolutions (``input.body.conv``, ``trunk.blocks.0.conv1``...).
        one_network: parameters of one plain network (the universal stem and trunk with one set of batch
            norms and a head of the universal source's outputs): the unit of "parameters relative to one
            network".
    """

    def __init__(
        self,
        stem: nn.Module,
        trunk: Backbone,
        specs: Sequence[TaskSpec],
        source: TaskSpec,
        own_stems: dict[str, nn.Module],
        heads: dict[str, nn.Module],
        kind: str,
        adapted: list[str],
        one_network: int,
    ) -> None:
        super().__init__()
        self.input = InputLayer(stem, source.input_size)
        self.trunk = trunk
        self.own_stems = nn.ModuleDict(own_stems)
        self.heads = nn.ModuleDict(heads)
        self.specs = {s.name: s for s in specs}
        self.source = source
        self.kind = kind
        self.adapted = list(adapted)
        self.one_network = int(one_network)

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def spec(self, task: str) -> TaskSpec:
        if task not in self.specs:
            raise TaskError(f"domain '{task}' has no adapters: the model has domains {self.tasks}")
        return self.specs[task]

    def check_input(self, x: torch.Tensor, task: str) -> None:
        """Raise DataError when ``x`` is not a batch of the domain's input shape."""
        check_input_shape(self.spec(task), x, "domain")

    def route(self, task: str, level: int | None = None) -> Route:
        """The domain's route (one level per domain)."""
        self._check_level(task, level)
        return Route(task)

    def _check_level(self, task: str, level: int | None) -> None:
        self.spec(task)
        if level not in (None, 1):
            raise BudgetError(f"domain '{task}' has levels [1], not {level}")

    def task_network(self, task: str, level: int | None = None) -> TaskNet:
        """The domain's network (unfused; call it with :meth:`route`), sharing this model's modules."""
        self._check_level(task, level)
        return TaskNet(self.stem_for(task), self.trunk, self.heads[task])

    def parameter_usage(self, task: str, level: int | None = None) -> dict[str, torch.Tensor]:
        """The universal weights the domain's input layer and trunk read, the domain's adapters in the
        form in use (with the shared ``beta`` once compressed), its batch norms, head and own stem."""
        net_ids = {id(p) for p in self.task_network(task, level).parameters()}
        used = {id(p) for p in self.universal_parameters()} | {id(p) for p in self.domain_parameters(task)}
        for b in self.banks():
            if b.shared_count() and task in b.alphas:
                used.add(id(b.beta))
        return {
            n: torch.ones_like(p, dtype=torch.bool)
            for n, p in self.named_parameters()
            if id(p) in used and id(p) in net_ids
        }

    def structure(self) -> dict[str, Any]:
        """The adapter kind, the adapted convolutions and whether the adapters are compressed (SVD)."""
        return {
            "kind": self.kind,
            "adapted": list(self.adapted),
            "compressed": any(bool(b.compressed) for b in self.banks() if b.rank is not None),
        }

    def apply_structure(self, structure: Mapping[str, Any]) -> None:
        saved = dict(structure)
        compressed = saved.pop("compressed", None)
        if not isinstance(compressed, bool):
            raise CheckpointError(f"structure.compressed: expected true or false, got {compressed!r}")
        own = self.structure()
        own.pop("compressed")
        check_structure(saved, own)
        ranked = [b for b in self.banks() if b.rank is not None]
        if compressed and not ranked:
            raise CheckpointError("structure.compressed: this model's adapters have no rank to compress to")
        for b in ranked:
            b.compressed.fill_(compressed)

    def _route(self, task: str, route: Route | None) -> Route:
        self.spec(task)
        if route is None:
            return Route(task)
        if route.task != task:
            raise TaskError(f"route for domain '{route.task}' passed with domain '{task}'")
        return route

    def stem_for(self, task: str) -> nn.Module:
        """The input layer of ``task``: its own stem, or the universal one (with resizing)."""
        self.spec(task)
        return self.own_stems[task] if task in self.own_stems else self.input

    def forward(self, x: torch.Tensor, task: str, route: Route | None = None) -> torch.Tensor:
        """Logits ``(B, num_outputs)`` of domain ``task``."""
        route = self._route(task, route)
        h = call(self.stem_for(task), x, route)  # (B, C0, S, S)
        return call(self.heads[task], self.trunk(h, route), route)  # (B, num_outputs)

    # ---- parameters --------------------------------------------------------------------------------
    def adapter_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, layer)`` of every adapter-wrapped convolution."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, AdapterConv)]

    def banks(self) -> list[AdapterBank]:
        return [m for m in self.modules() if isinstance(m, AdapterBank)]

    def domain_parameters(self, domain: str, adapters: bool = True, rest: bool = True) -> list[nn.Parameter]:
        """The parameters adapting ``domain`` trains: its adapters in the form in use (``adapters``) and its
        batch norms (the series adapters' own included), head and own stem (``rest``)."""
        self.spec(domain)
        params: list[nn.Parameter] = []
        if adapters:
            for b in self.banks():
                if domain in b.alphas:  # the universal stem's banks lack the domains with their own stem
                    params += b.trainable(domain)
        if rest:
            for m in self.modules():
                if isinstance(m, DomainBatchNorm) and domain in m.norms:
                    params += list(m.norms[domain].parameters())
                elif isinstance(m, SeriesAdapterConv2d) and domain in m.norms:
                    params += list(m.norms[domain].parameters())
            params += list(self.heads[domain].parameters())
            if domain in self.own_stems:
                params += list(self.own_stems[domain].parameters())
        return params

    def set_requires_grad(self) -> None:
        """Only what some phase trains requires gradients: every domain's adapters (full-rank and, once
        compressed, its factors), batch norms, heads and own stems. The universal weights and the shared
        low-rank ``beta`` (fixed after the SVD, as in the paper) do not."""
        trainable = {id(p) for d in self.tasks for p in self.domain_parameters(d)}
        for b in self.banks():
            trainable.update(id(p) for p in (b.gammas or {}).values())
            trainable.update(id(p) for p in (b.betas or {}).values())
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)

    def universal_parameters(self) -> list[nn.Parameter]:
        """The frozen universal weights (the pretrained convolutions): every parameter that belongs to no
        domain and to no adapter bank."""
        own: set[int] = set()
        for m in self.modules():
            if isinstance(m, (AdapterBank, DomainBatchNorm)):
                own.update(id(p) for p in m.parameters())
            elif isinstance(m, SeriesAdapterConv2d):
                own.update(id(p) for p in m.norms.parameters())
        own.update(id(p) for p in self.heads.parameters())
        own.update(id(p) for p in self.own_stems.parameters())
        return [p for p in self.parameters() if id(p) not in own]

    def parameter_counts(self) -> dict[str, Any]:
        """Parameters a deployment of every domain stores (the adapters in the form in use; full-rank
        adapters replaced by factors are not counted), batch-norm statistics excluded.

        Returns ``{"universal", "shared_adapters", "per_domain": {domain: n}, "total", "one_network",
        "relative"}`` with ``total = universal + shared_adapters + sum(per_domain)`` and ``relative =
        total / one_network``.
        """
        universal = sum(p.numel() for p in self.universal_parameters())
        shared = sum(b.shared_count() for b in self.banks())
        per = {d: sum(p.numel() for p in self.domain_parameters(d)) for d in self.tasks}
        total = universal + shared + sum(per.values())
        return {
            "universal": universal,
            "shared_adapters": shared,
            "per_domain": per,
            "total": total,
            "one_network": self.one_network,
            "relative": total / self.one_network,
        }

    # ---- deployment --------------------------------------------------------------------------------
    def fused_network(self, domain: str) -> TaskNet:
        """``domain``'s standalone network with every adapter fused (plain layers, no shared tensor):
        ``stem.*`` (resizing + stem), ``trunk.*``, ``head.*``. Outputs equal the unfused model's up to float
        rounding (eval mode)."""
        stem = self.stem_for(domain)
        stem = fuse_module(stem, domain)
        net = TaskNet(stem, fuse_module(self.trunk, domain), fuse_module(self.heads[domain], domain))
        for p in net.parameters():
            p.requires_grad_(True)
        return net.eval()

    @torch.no_grad()
    def unfuse(self, fused: TaskNet, domain: str) -> None:
        """Take ``domain`` out of a fused network (:meth:`fused_network` of a parallel model) into this
        model: each adapter ``alpha_t = centre(g) - centre(f)``, the batch norms and the head copied.
        ConfigError when ``fused`` is not a fusion of this model's universal weights."""
        if self.kind != "parallel":
            raise ConfigError(
                "only parallel adapters can be taken out of a fused network (series fusion mixes f)"
            )
        stem = self.stem_for(domain)
        for part, mine in (("stem", stem), ("trunk", self.trunk)):
            theirs = getattr(fused, part)
            for name, m in mine.named_modules():
                if isinstance(m, AdapterConv):
                    m.unfuse(theirs.get_submodule(name), domain)  # type: ignore[union-attr]
                elif isinstance(m, DomainBatchNorm):
                    m.norm(domain).load_state_dict(theirs.get_submodule(name).state_dict())
        self.heads[domain].load_state_dict(fused.head.state_dict())


class DomainNetwork(nn.Module):
    """One domain of an :class:`AdapterNet`, unfused: ``forward(x) = model(x, domain)`` (shares the model's
    modules; for timing the in-library forward against fused exports)."""

    def __init__(self, model: AdapterNet, domain: str) -> None:
        super().__init__()
        model.spec(domain)
        self.model = model
        self.domain = domain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.domain)


# ---- building ------------------------------------------------------------------------------------------
def block_stages(trunk: nn.Module) -> list[int]:
    """Macro-block (stage) of each block of ``trunk.blocks``: a new stage starts where a block changes the
    resolution (stride > 1) or the width. ConfigError for a trunk without residual blocks."""
    blocks = getattr(trunk, "blocks", None)
    if blocks is None or not all(hasattr(b, "conv1") and hasattr(b, "conv2") for b in blocks):
        raise ConfigError(
            f"{type(trunk).__name__} has no residual blocks of two convolutions (conv1, conv2): placements "
            "early/mid/late/half need resnet, resnet26 or wrn; use placement 'all' or layers"
        )
    stages: list[int] = []
    prev_width = None
    for i, b in enumerate(blocks):
        width = b.conv2.out_channels
        new = i > 0 and (max(b.conv1.stride) > 1 or width != prev_width)
        stages.append((stages[-1] + 1 if new else stages[-1]) if stages else 0)
        prev_width = width
    return stages


def placement_layers(stem: nn.Module, trunk: nn.Module, placement: str) -> list[str]:
    """Names (``input.body.*``, ``trunk.*``) of the convolutions a placement adapts (Sec. 3.2)."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    stem_convs = [n for n, _ in adaptable_convs(stem, prefix="input.body.")] if _has_conv(stem) else []
    trunk_convs = [n for n, _ in adaptable_convs(trunk, prefix="trunk.")]
    if placement == "all":
        return stem_convs + trunk_convs
    stages = block_stages(trunk)
    if placement == "half":
        return [f"trunk.blocks.{i}.conv2" for i in range(len(stages))]
    if max(stages) != 2:
        raise ConfigError(
            f"placement '{placement}' needs a trunk of three macro-blocks (early, mid, late); "
            f"{type(trunk).__name__} has {max(stages) + 1}"
        )
    want = {"early": 0, "mid": 1, "late": 2}[placement]
    blocks = {f"trunk.blocks.{i}." for i, s in enumerate(stages) if s == want}
    chosen = [n for n in trunk_convs if any(n.startswith(b) for b in blocks)]
    return (stem_convs if placement == "early" else []) + chosen


def _has_conv(m: nn.Module) -> bool:
    try:
        adaptable_convs(m)
    except ConfigError:
        return False
    return True


def pattern_layers(stem: nn.Module, trunk: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the convolutions matched by ``patterns`` (fnmatch over ``input.body.*`` and ``trunk.*``)."""
    root = nn.Module()
    root.add_module("input", nn.Module())
    root.input.add_module("body", stem)
    root.add_module("trunk", trunk)
    return [n for n, _ in adaptable_convs(root, patterns)]


def source_of(path: str, source: str | None) -> tuple[TaskSpec, dict[str, torch.Tensor], int]:
    """The universal network of checkpoint ``path``: its source task's spec, its state dict re-keyed as
    ``trunk.*``, ``stem.*`` and ``head.*`` (the source task's), and the side of the trunk's input there.

    Accepts checkpoints of :class:`~virtnet.backbones.base.MultiTaskNet` models (``joint``, ``finetune``,
    ``feature_extraction``: keys ``trunk.*``, ``stems.<task or shared>.*``, ``heads.<task>.*``) and of
    ``individual`` (``nets.<task>.*``)."""
    ck = load_checkpoint(path)
    tasks = [TaskSpec.from_dict(t) for t in ck.meta.get("tasks", [])]
    if not tasks:
        raise CheckpointError(f"{path}: checkpoint has no task list")
    names = [t.name for t in tasks]
    name = source or names[0]
    if name not in names:
        raise ConfigError(f"method.source: '{name}' is not a task of {path} (tasks: {names})")
    spec = next(t for t in tasks if t.name == name)
    state = ck.model_state
    prefix = f"nets.{name}." if any(k.startswith(f"nets.{name}.trunk.") for k in state) else ""
    if not any(k.startswith(f"{prefix}trunk.") for k in state):
        raise CheckpointError(f"{path}: no universal trunk in this checkpoint (no 'trunk.*' tensors)")
    stem_key = (
        f"{prefix}stems.shared." if any(k.startswith(f"{prefix}stems.shared.") for k in state) else None
    )
    stem_key = stem_key or f"{prefix}stems.{name}."
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(f"{prefix}trunk."):
            out[k[len(prefix) :]] = v
        elif k.startswith(stem_key):
            out["stem." + k[len(stem_key) :]] = v
        elif k.startswith(f"{prefix}heads.{name}."):
            out["head." + k[len(f"{prefix}heads.{name}.") :]] = v
    if not any(k.startswith("stem.") for k in out):
        raise CheckpointError(f"{path}: no stem for task '{name}' (looked for '{stem_key}*')")
    model_cfg = (ck.meta.get("config") or {}).get("model") or {}
    feature_size = model_cfg.get("feature_size") or default_feature_size(tasks)
    return spec, out, int(feature_size)


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, path: str) -> None:
    own = module.state_dict()
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    for k, t in own.items():
        if k not in part or part[k].shape != t.shape:
            raise CheckpointError(
                f"{path}: saved for a different network: no tensor '{prefix}{k}' of shape {tuple(t.shape)} "
                "(is the run's model: section the one the universal network was trained with?)"
            )
    module.load_state_dict({k: part[k] for k in own})


def build_adapter_net(specs: Sequence[TaskSpec], backbone: BackboneConfig, cfg: Any) -> AdapterNet:
    """The adapter network for the domains ``specs`` (an :class:`AdaptersConfig` ``cfg``), from the
    universal network of ``cfg.init_from`` (or randomly initialised universal weights without it).

    The universal stem is the source task's (``cfg.source``, default the checkpoint's first task); without
    ``init_from`` it is built for the first domain's input shape. Domains with the source's channels share
    it; the others get their own stem. A domain named like the source task starts from the source's head.
    """
    specs = list(specs)
    if not specs:
        raise ConfigError("tasks: adapters need at least one domain")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: domain names must be unique, got {names}")
    pretrained: dict[str, torch.Tensor] | None = None
    if cfg.init_from:
        source, pretrained, feature_size = source_of(cfg.init_from, cfg.source)
        if backbone.feature_size is not None and backbone.feature_size != feature_size:
            raise ConfigError(
                f"model.feature_size: {backbone.feature_size}, but the universal network of {cfg.init_from} "
                f"runs its trunk at {feature_size}"
            )
    else:
        if cfg.source is not None:
            raise ConfigError("method.source needs method.init_from")
        source = TaskSpec("universal", specs[0].in_channels, specs[0].input_size, specs[0].num_outputs)
        feature_size = backbone.feature_size or default_feature_size(specs)
    trunk = build_backbone(backbone, feature_size)
    stem = trunk.make_stem(source.in_channels, source.input_size)
    init_weights(trunk, backbone.init)
    init_weights(stem, backbone.init)
    head_template = Linear(trunk.feature_channels, source.num_outputs)
    one_network = sum(p.numel() for m in (stem, trunk, head_template) for p in m.parameters())
    if pretrained is not None:
        _load_part(trunk, pretrained, "trunk.", cfg.init_from)
        _load_part(stem, pretrained, "stem.", cfg.init_from)

    shared = [s.name for s in specs if s.in_channels == source.in_channels]
    own_stems: dict[str, nn.Module] = {}
    for s in specs:
        if s.name not in shared:
            own = trunk.make_stem(s.in_channels, s.input_size)
            init_weights(own, backbone.init)
            own_stems[s.name] = own
    heads: dict[str, nn.Module] = {}
    for s in specs:
        head = Linear(trunk.feature_channels, s.num_outputs)
        init_weights(head, backbone.init)
        if pretrained is not None and s.name == source.name and "head.weight" in pretrained:
            if pretrained["head.weight"].shape == head.weight.shape:
                _load_part(head, pretrained, "head.", cfg.init_from)
        heads[s.name] = head

    if cfg.layers is not None:
        convs = pattern_layers(stem, trunk, cfg.layers)
    else:
        convs = placement_layers(stem, trunk, cfg.placement)
    second = {f"trunk.blocks.{i}.conv2" for i in range(len(getattr(trunk, "blocks", [])))}

    def dropout(name: str) -> float:
        return cfg.dropout if name in second else 0.0

    stem_convs = [n[len("input.body.") :] for n in convs if n.startswith("input.body.")]
    trunk_convs = [n[len("trunk.") :] for n in convs if n.startswith("trunk.")]
    kw = dict(kind=cfg.kind, shared=cfg.compression != "svd_single", impl=cfg.parallel_impl)
    for module, chosen, domains, prefix in (
        (stem, stem_convs, shared, "input.body."),
        (trunk, trunk_convs, names, "trunk."),
    ):
        if not domains:
            continue
        ranks = {n: layer_rank(module.get_submodule(n), len(domains), cfg, prefix + n) for n in chosen}
        inject_adapters(module, domains, [], norms=True)  # every batch norm per domain
        for n in chosen:  # the rank depends on the layer's width
            drop = lambda name, p=prefix: dropout(p + name)  # noqa: E731
            inject_adapters(module, domains, [n], rank=ranks[n], dropout=drop, norms=False, **kw)

    model = AdapterNet(stem, trunk, specs, source, own_stems, heads, cfg.kind, convs, one_network)
    model.set_requires_grad()
    return model


def layer_rank(conv: nn.Conv2d, domains: int, cfg: Any, name: str) -> int | None:
    """The rank ``K`` of one layer's factors (None: no compression, or full-rank adapters kept).

    ConfigError when ``K`` exceeds the layer's ``C = C_out``. A layer whose adapters have fewer than ``K``
    singular values (``T C_in`` stacked, or ``C_in`` alone: the stem's, with one input channel) keeps its
    full-rank adapters.
    """
    k = cfg.rank_for(conv.out_channels)
    if k is None:
        return None
    if k > conv.out_channels:
        raise ConfigError(
            f"method.svd_rank: K = {k} is larger than C = {conv.out_channels} of layer '{name}' "
            f"({conv.out_channels} outputs): K must be at most C"
        )
    c_in = conv.in_channels // conv.groups
    if k > rank_limit(conv.out_channels, c_in, domains, cfg.compression == "svd"):
        return None
    return k


__all__ = [
    "AdapterNet",
    "DomainNetwork",
    "InputLayer",
    "PLACEMENTS",
    "block_stages",
    "build_adapter_net",
    "placement_layers",
    "source_of",
]
