"""Residual adapter layers: series and parallel adapters, per-domain batch norm, low-rank adapter banks,
fusing, and parallel adapters plugged into any pretrained ``nn.Module``.

Rebuffi, Bilen and Vedaldi, "Efficient parametrization of multi-domain deep neural networks", CVPR 2018:
series adapters (Sec. 3.1.1, from "Learning multiple visual domains with residual adapters", NIPS 2017),
parallel adapters (Sec. 3.1.2), cross-domain compression (Sec. 3.4). Sketch, for a universal filter bank
``f`` (L x L, frozen) and the adapter ``alpha_t`` (C_out x C_in) of domain ``t``::

    series     z = f * x;   y = z + diag_1(alpha_t) * BN_t(z)           (BN_t: the adapter's own batch norm)
    parallel   y = f * x + diag_1(alpha_t) * x  =  (f + diag_L(alpha_t)) * x
    fused      parallel: g_t = f + diag_L(alpha_t) (alpha_t added to the kernel centre),
               undone by alpha_t = centre(g_t) - centre(f);
               series (eval): g_t = (I + alpha_t diag(a_t)) f, bias alpha_t b_t, where BN_t(z) = a_t z + b_t
    low rank   alpha_t = beta gamma_t^T; beta (C_out x K) shared by the domains (or one per domain),
               gamma_t (C_in x K) per domain; obtained from the SVD of [alpha_1 ... alpha_T]

The domain is always an argument, never a global: the route-aware layers read ``route.task``;
:class:`ParallelAdapters` takes ``domain=`` and runs the user's module with ``torch.func.functional_call``,
substituting the domain's folded kernels and batch-norm tensors for the universal ones (a parallel adapter
folded into the kernel centre is exactly a parameter substitution).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from virtnet.errors import ConfigError, TaskError
from virtnet.nn.layers import call
from virtnet.nn.protocol import RoutedLayer
from virtnet.nn.units import Route

KINDS = ("parallel", "series")


# ---- the algebra ---------------------------------------------------------------------------------------
def _centre(kernel_size: Sequence[int]) -> tuple[int, int]:
    kh, kw = int(kernel_size[0]), int(kernel_size[1])
    return kh // 2, kw // 2


def fold_parallel(weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``g = f + diag_L(alpha)``: the parallel adapter added to the centre of every kernel.

    Args:
        weight: the universal filters ``f``, ``(C_out, C_in / groups, kh, kw)`` with odd ``kh``, ``kw``.
        alpha: the adapter, ``(C_out, C_in / groups)``.

    Returns:
        A new tensor in ``weight``'s memory format (differentiable in both arguments); ``weight`` is not
        modified.
    """
    ch, cw = _centre(weight.shape[-2:])
    g = weight.clone()  # (C_out, C_in, kh, kw)
    g[:, :, ch, cw] = g[:, :, ch, cw] + alpha
    return g


def unfold_parallel(fused: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The adapter taken out of a fused kernel: ``alpha = centre(g) - centre(f)``.

    Raises ConfigError unless ``fused`` equals ``weight`` away from the kernel centre (it is then not a
    fusion of these universal filters).
    """
    if fused.shape != weight.shape:
        raise ConfigError(
            f"fused kernel of shape {tuple(fused.shape)} for filters of shape {tuple(weight.shape)}"
        )
    ch, cw = _centre(weight.shape[-2:])
    off = torch.ones(weight.shape[-2:], dtype=torch.bool, device=weight.device)
    off[ch, cw] = False
    if not torch.equal(fused[..., off], weight[..., off]):
        raise ConfigError(
            "the fused kernel differs from the universal filters away from the centre: not a fusion"
        )
    return fused[:, :, ch, cw] - weight[:, :, ch, cw]


def bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``bn(z) = a * z + b`` per channel in eval mode (running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError("a batch norm without running statistics cannot be folded")
    a = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight
    b = -bn.running_mean * a
    if bn.bias is not None:
        b = b + bn.bias
    return a, b


def fold_series(
    weight: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor, bn: _BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``y = z + alpha * BN(z)``, ``z = f * x + c``, into one convolution ``g * x + d`` (eval mode).

    With ``BN(z) = a z + b``: ``M = I + alpha diag(a)``, ``g = M f`` (mixing output channels), ``d = M c +
    alpha b``. Returns ``(g, d)``.
    """
    a, b = bn_affine(bn)
    m = torch.eye(alpha.shape[0], dtype=alpha.dtype, device=alpha.device) + alpha * a[None, :]  # (C, C)
    g = torch.einsum("ok,kihw->oihw", m, weight)  # (C_out, C_in, kh, kw)
    d = alpha @ b
    if bias is not None:
        d = d + m @ bias
    return g, d


def check_foldable(conv: nn.Module, name: str = "") -> None:
    """Raise ConfigError unless ``conv`` can hold a parallel adapter: an ``nn.Conv2d`` with odd kernel sides,
    at least one larger than 1, and no unit partition."""
    where = f"layer '{name}'" if name else "the layer"
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(
            f"{where} is a {type(conv).__name__}: adapters wrap nn.Conv2d layers with an odd kernel larger "
            "than 1"
        )
    kh, kw = conv.kernel_size
    if kh % 2 == 0 or kw % 2 == 0 or max(kh, kw) == 1:
        raise ConfigError(
            f"{where} has a {kh}x{kw} kernel: adapters need odd kernel sides, at least one larger than 1 "
            "(a kernel centre to fold the 1x1 adapter into)"
        )
    if getattr(conv, "in_partition", None) is not None or getattr(conv, "out_partition", None) is not None:
        raise ConfigError(f"{where} is split into units: adapters do not support unit routes")


def domain_of(route: Route | None) -> str:
    """The domain a forward pass runs: ``route.task``. TaskError when there is no route."""
    if route is None:
        raise TaskError(
            "adapter layers need the domain: pass a Route whose task names it, e.g. model(x, 'mnist')"
        )
    return route.task


def _no_domain(domain: str, have: Iterable[str]) -> TaskError:
    return TaskError(f"domain '{domain}' has no adapters (domains with adapters: {sorted(have)})")


# ---- adapter banks -------------------------------------------------------------------------------------
def rank_limit(out_channels: int, in_channels: int, domains: int, shared: bool = True) -> int:
    """The most singular values the factors can keep: ``min(C_out, T C_in)`` for the stacked adapters of
    ``T`` domains (shared), ``min(C_out, C_in)`` for one adapter."""
    return min(out_channels, domains * in_channels if shared else in_channels)


class AdapterBank(nn.Module):
    """The adapter matrices ``alpha_t`` of one layer, one per domain, optionally low rank.

    Full rank: ``alphas[t]`` of shape ``(C_out, C_in)``, initialised to zero (so every domain starts as the
    universal network). With ``rank=K`` the bank also holds the factors of :meth:`compress`: ``beta``
    ``(C_out, K)``, shared by the domains (``shared=True``, Sec. 3.4's cross-domain compression) or one per
    domain in ``betas`` (single-domain low rank), and ``gammas[t]`` ``(C_in, K)``. The buffer ``compressed``
    says which form is in use, so a saved model comes back in the same form; the full-rank ``alphas`` stay
    (frozen) as the matrices the factors were computed from.

    Args:
        out_channels: ``C_out``.
        in_channels: ``C_in`` (of one group, for grouped convolutions).
        domains: the domains.
        rank: ``K`` (None: full rank only). ConfigError when ``K`` exceeds the number of singular values
            (``C_out``, and for single-domain factors also ``C_in``).
        shared: one ``beta`` for every domain (True) or one per domain.
    """

    def __init__(
        self,
        out_channels: int,
        in_channels: int,
        domains: Sequence[str],
        rank: int | None = None,
        shared: bool = True,
    ) -> None:
        super().__init__()
        if not domains:
            raise ConfigError("an adapter bank needs at least one domain")
        self.out_channels = out_channels
        self.in_channels = in_channels
        self.alphas = nn.ParameterDict(
            {d: nn.Parameter(torch.zeros(out_channels, in_channels)) for d in domains}
        )
        self.rank = rank
        self.shared = shared
        self.beta: nn.Parameter | None = None
        self.betas: nn.ParameterDict | None = None
        self.gammas: nn.ParameterDict | None = None
        if rank is not None:
            limit = rank_limit(out_channels, in_channels, len(domains), shared)
            if rank < 1 or rank > limit:
                stacked = f"T = {len(domains)} stacked" if shared else "one"
                raise ConfigError(
                    f"svd rank K = {rank} is larger than C = {limit} (the singular values of {stacked} "
                    f"{out_channels}x{in_channels} adapters): K must be between 1 and C"
                )
            if shared:
                self.beta = nn.Parameter(torch.zeros(out_channels, rank))
            else:
                self.betas = nn.ParameterDict(
                    {d: nn.Parameter(torch.zeros(out_channels, rank)) for d in domains}
                )
            self.gammas = nn.ParameterDict({d: nn.Parameter(torch.zeros(in_channels, rank)) for d in domains})
        self.register_buffer("compressed", torch.zeros((), dtype=torch.bool))

    @property
    def domains(self) -> list[str]:
        return list(self.alphas.keys())

    def _check(self, domain: str) -> None:
        if domain not in self.alphas:
            raise _no_domain(domain, self.alphas.keys())

    def sources(self, domain: str) -> list[torch.Tensor]:
        """Every tensor ``alpha(domain)`` reads (for caches keyed on their versions; on the eval path of
        every adapter layer, hence the direct dictionary lookups)."""
        alpha = self._modules["alphas"]._parameters.get(domain)  # type: ignore[union-attr]
        if alpha is None:
            raise _no_domain(domain, self.alphas.keys())
        tensors = [self._buffers["compressed"], alpha]
        if self.rank is not None:
            tensors += list(self.factors(domain))
        return tensors  # type: ignore[return-value]

    def factors(self, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(beta, gamma_t)`` of a compressed bank."""
        self._check(domain)
        assert self.gammas is not None
        beta = self.beta if self.shared else self.betas[domain]  # type: ignore[index]
        assert beta is not None
        return beta, self.gammas[domain]

    def alpha(self, domain: str) -> torch.Tensor:
        """The domain's adapter ``(C_out, C_in)``: ``alphas[t]``, or ``beta gamma_t^T`` once compressed."""
        self._check(domain)
        if self.rank is not None and bool(self.compressed):
            beta, gamma = self.factors(domain)
            return beta @ gamma.t()  # (C_out, K) (K, C_in)
        return self.alphas[domain]

    @torch.no_grad()
    def compress(self) -> None:
        """Set the factors from the SVD of the full-rank adapters and switch to them (Sec. 3.4).

        Shared: ``[alpha_1 ... alpha_T] = U S V^T`` (``C_out x T C_in``), keep the top ``K``:
        ``beta = U_K S_K``, ``gamma_t`` = the rows of ``V_K`` of domain ``t``. Single: the same per domain.
        """
        if self.rank is None:
            raise ConfigError("this adapter bank was built without a rank: nothing to compress to")
        assert self.gammas is not None
        k, c_in = self.rank, self.in_channels
        domains = self.domains
        if self.shared:
            stacked = torch.cat([self.alphas[d] for d in domains], dim=1)  # (C_out, T C_in)
            u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
            assert self.beta is not None
            self.beta.copy_(u[:, :k] * s[:k])  # (C_out, K)
            for i, d in enumerate(domains):
                self.gammas[d].copy_(vh[:k, i * c_in : (i + 1) * c_in].t())  # (C_in, K)
        else:
            assert self.betas is not None
            for d in domains:
                u, s, vh = torch.linalg.svd(self.alphas[d], full_matrices=False)
                self.betas[d].copy_(u[:, :k] * s[:k])
                self.gammas[d].copy_(vh[:k].t())
        self.compressed.fill_(True)

    def trainable(self, domain: str) -> list[nn.Parameter]:
        """What adapting ``domain`` trains now: ``alphas[t]``; once compressed ``gamma_t`` (shared ``beta``
        stays fixed, as in the paper) or ``beta_t, gamma_t`` (single-domain factors)."""
        self._check(domain)
        if self.rank is not None and bool(self.compressed):
            assert self.gammas is not None
            if self.shared:
                return [self.gammas[domain]]
            assert self.betas is not None
            return [self.betas[domain], self.gammas[domain]]
        return [self.alphas[domain]]

    def used(self, domain: str) -> dict[str, torch.Tensor]:
        """Bool masks (all True) of the tensors ``alpha(domain)`` reads, by name in this bank: ``alphas.t``
        before compression, the factors (``beta`` or ``betas.t``, and ``gammas.t``) after."""
        self._check(domain)
        if self.rank is not None and bool(self.compressed):
            names = ["beta" if self.shared else f"betas.{domain}", f"gammas.{domain}"]
        else:
            names = [f"alphas.{domain}"]
        params = dict(self.named_parameters())
        return {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}

    def domain_count(self, domain: str) -> int:
        """Parameters a deployed bank stores for ``domain`` alone (the form in use)."""
        return sum(p.numel() for p in self.trainable(domain))

    def shared_count(self) -> int:
        """Parameters a deployed bank shares between domains (the shared ``beta`` once compressed)."""
        if self.rank is not None and bool(self.compressed) and self.shared:
            assert self.beta is not None
            return self.beta.numel()
        return 0

    def extra_repr(self) -> str:
        return f"{self.out_channels}x{self.in_channels}, rank={self.rank}, shared={self.shared}"


# ---- route-aware layers (virtnet backbones) ------------------------------------------------------------
class DomainBatchNorm(nn.Module, RoutedLayer):
    """One batch norm per domain (copies of ``template``, keyed by domain); ``route.task`` picks it.

    Args:
        template: the batch norm to copy (its affine parameters and running statistics).
        domains: the domains.
    """

    def __init__(self, template: _BatchNorm, domains: Sequence[str]) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({d: copy.deepcopy(template) for d in domains})

    def norm(self, domain: str) -> nn.Module:
        if domain not in self.norms:
            raise _no_domain(domain, self.norms.keys())
        return self.norms[domain]

    # the routed-layer protocol: the domain's own batch norm alone
    def plain(self, route: Route | None) -> nn.Module:
        """A copy of the domain's batch norm."""
        return copy.deepcopy(self.norm(domain_of(route)))

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        return {}

    def delegates(self, route: Route | None) -> list[str]:
        domain = domain_of(route)
        self.norm(domain)
        return [f"norms.{domain}"]

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        bn = self._modules["norms"]._modules.get(domain_of(route))  # type: ignore[union-attr]
        if bn is None:
            raise _no_domain(domain_of(route), self.norms.keys())
        stats = bn._buffers
        if (
            not bn.training
            and stats.get("running_mean") is not None
            and getattr(bn, "partition", None) is None
        ):
            # eval: what nn.BatchNorm2d computes with running statistics, without a second module call
            p = bn._parameters
            return F.batch_norm(
                x,
                stats["running_mean"],
                stats["running_var"],
                p.get("weight"),
                p.get("bias"),
                False,
                0.0,
                bn.eps,
            )
        return call(bn, x, route)


def _conv_like(conv: nn.Conv2d, bias: bool) -> nn.Conv2d:
    """A new convolution of ``conv``'s class and geometry (with or without a bias)."""
    new = type(conv)(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=bias,
        padding_mode=conv.padding_mode,
    )
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _centre_aligned(conv: nn.Conv2d) -> bool:
    """True when a 1x1 convolution of the input (same stride) reads exactly the kernel centres' pixels."""
    if conv.padding == "same":
        return True
    if conv.padding == "valid" or isinstance(conv.padding, str):
        return False
    return all(
        p == d * (k // 2) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size, strict=True)
    )


class _FoldCache:
    """The folded kernel of the last domain run without autograd (eval). It is valid while the domain is
    the same and every tensor it was computed from is the same object, at the same version and memory
    (an optimizer step, ``load_state_dict`` or a memory-format swap recomputes it). One entry per layer:
    one network's kernels at most."""

    def __init__(self) -> None:
        self.enabled = True
        self._entry: tuple[str, list[tuple[torch.Tensor, int, int]], Any] | None = None

    def get(self, domain: str, sources: list[torch.Tensor], make: Callable[[], Any]) -> Any:
        if not self.enabled or torch.is_grad_enabled():
            return make()
        e = self._entry
        if e is not None and e[0] == domain and len(e[1]) == len(sources):
            for (a, v, p), t in zip(e[1], sources, strict=True):
                if a is not t or a._version != v or a.data_ptr() != p:
                    break
            else:
                return e[2]
        value = make()
        self._entry = (domain, [(t, t._version, t.data_ptr()) for t in sources], value)
        return value

    def clear(self) -> None:
        self._entry = None


def set_fold_cache(module: nn.Module, enabled: bool) -> None:
    """Turn the eval-mode folded-kernel cache of every adapter layer in ``module`` on or off (off also
    empties it)."""
    for m in module.modules():
        if isinstance(m, (ParallelAdapterConv2d, SeriesAdapterConv2d)):
            m.fold_cache.enabled = enabled
            m.fold_cache.clear()


class ParallelAdapterConv2d(nn.Module, RoutedLayer):
    """A universal convolution with a parallel adapter per domain: ``y = f * x + diag_1(alpha_t) * x``.

    Two computations, equal up to float rounding: ``"fold"`` runs one convolution with ``f + diag_L(alpha_t)``
    (the default; without autograd the folded kernel of the last domain is cached, see :class:`_FoldCache`),
    ``"branch"`` runs the 1x1 adapter beside the universal convolution. The branch is used whenever
    ``dropout`` is active (training): dropout applies to the adapter's input only, "akin to injecting
    additive noise to the output of the network filters" (Sec. 3.3).

    Args:
        conv: the universal convolution (not copied; frozen by the caller).
        domains: the domains.
        rank: low-rank factors of the adapters (see :class:`AdapterBank`).
        shared: one ``beta`` for every domain.
        dropout: dropout probability on the adapter's input while training.
        impl: ``"fold"`` or ``"branch"``.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        domains: Sequence[str],
        rank: int | None = None,
        shared: bool = True,
        dropout: float = 0.0,
        impl: str = "fold",
    ) -> None:
        super().__init__()
        check_foldable(conv)
        if impl not in ("fold", "branch"):
            raise ConfigError(f"impl must be 'fold' or 'branch', got {impl!r}")
        if (impl == "branch" or dropout > 0) and not _centre_aligned(conv):
            raise ConfigError(
                f"padding {conv.padding} does not centre a {conv.kernel_size} kernel: the 1x1 branch would "
                "not align with the kernel centre (use impl 'fold' without dropout)"
            )
        self.conv = conv
        bank = AdapterBank(conv.out_channels, conv.in_channels // conv.groups, domains, rank, shared)
        self.adapter = bank.to(device=conv.weight.device, dtype=conv.weight.dtype)
        self.dropout = float(dropout)
        self.impl = impl
        self.fold_cache = _FoldCache()

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        domain = domain_of(route)
        conv = self.conv
        if self.impl == "fold" and not (self.training and self.dropout > 0):
            f = conv.weight
            sources = [f, *self.adapter.sources(domain)]
            weight = self.fold_cache.get(
                domain, sources, lambda: fold_parallel(f, self.adapter.alpha(domain))
            )
            return conv._conv_forward(x, weight, conv.bias)
        alpha = self.adapter.alpha(domain)  # (C_out, C_in)
        y = call(conv, x, route)  # (B, C_out, H', W')
        if self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout, training=True)
        return y + F.conv2d(x, alpha[:, :, None, None], stride=conv.stride, groups=conv.groups)

    @torch.no_grad()
    def fuse(self, domain: str) -> nn.Conv2d:
        """A plain convolution (the wrapped one's class) with ``g = f + diag_L(alpha_t)``."""
        conv = self.conv
        fused = _conv_like(conv, conv.bias is not None)
        fused.weight.copy_(fold_parallel(conv.weight, self.adapter.alpha(domain)))
        if conv.bias is not None:
            fused.bias.copy_(conv.bias)
        return fused

    # the routed-layer protocol: the universal convolution and the domain's adapter; plain = the fusion
    def plain(self, route: Route | None) -> nn.Module:
        return self.fuse(domain_of(route)).train(self.training)

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        return {f"adapter.{n}": m for n, m in self.adapter.used(domain_of(route)).items()}

    def delegates(self, route: Route | None) -> list[str]:
        return ["conv"]

    @torch.no_grad()
    def unfuse(self, fused: nn.Conv2d, domain: str) -> None:
        """Take ``domain``'s adapter out of a fused convolution into this layer (full-rank form)."""
        alpha = unfold_parallel(fused.weight, self.conv.weight)
        self.adapter._check(domain)
        self.adapter.alphas[domain].copy_(alpha)


class SeriesAdapterConv2d(nn.Module, RoutedLayer):
    """A universal convolution followed by a series adapter per domain:
    ``z = f * x``, ``y = z + diag_1(alpha_t) * BN_t(z)`` with the adapter's own batch norm ``BN_t``
    (the block's batch norm follows, as in Fig. 2a). Dropout (training only) applies to the adapter's input.
    In eval mode without autograd the layer runs as its fusion (:func:`fold_series`; the folded kernel of
    the last domain is cached).

    Args:
        conv: the universal convolution (groups must be 1).
        domains: the domains.
        rank: low-rank factors of the adapters (see :class:`AdapterBank`).
        shared: one ``beta`` for every domain.
        dropout: dropout probability on the adapter's input while training.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        domains: Sequence[str],
        rank: int | None = None,
        shared: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_foldable(conv)
        if conv.groups != 1:
            raise ConfigError("series adapters need convolutions with groups=1 (they mix output channels)")
        self.conv = conv
        c = conv.out_channels
        self.adapter = AdapterBank(c, c, domains, rank, shared).to(
            device=conv.weight.device, dtype=conv.weight.dtype
        )
        norms = nn.ModuleDict({d: nn.BatchNorm2d(c) for d in domains})
        self.norms = norms.to(device=conv.weight.device, dtype=conv.weight.dtype)
        self.dropout = float(dropout)
        self.fold_cache = _FoldCache()

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        domain = domain_of(route)
        norm = self.norms[domain]
        if not self.training and not torch.is_grad_enabled() and self.fold_cache.enabled:
            conv = self.conv
            sources = [
                conv.weight,
                *self.adapter.sources(domain),
                *norm._parameters.values(),
                *norm._buffers.values(),
            ]
            if conv.bias is not None:
                sources.append(conv.bias)
            g, d = self.fold_cache.get(
                domain, sources, lambda: fold_series(conv.weight, conv.bias, self.adapter.alpha(domain), norm)
            )
            return conv._conv_forward(x, g, d)
        alpha = self.adapter.alpha(domain)  # (C, C)
        z = call(self.conv, x, route)  # (B, C, H', W')
        a = z
        if self.training and self.dropout > 0:
            a = F.dropout(a, self.dropout, training=True)
        a = norm(a)
        return z + F.conv2d(a, alpha[:, :, None, None])

    @torch.no_grad()
    def fuse(self, domain: str) -> nn.Conv2d:
        """A plain convolution with bias: ``g = (I + alpha diag(a)) f``, bias ``alpha b`` (eval-mode BN)."""
        g, d = fold_series(self.conv.weight, self.conv.bias, self.adapter.alpha(domain), self.norms[domain])
        fused = _conv_like(self.conv, True)
        fused.weight.copy_(g)
        fused.bias.copy_(d)
        return fused

    # the routed-layer protocol: the universal convolution, the domain's adapter and its batch norm;
    # plain = the fusion (with its bias: absorbing it into the next batch norm is fuse_module's business)
    def plain(self, route: Route | None) -> nn.Module:
        return self.fuse(domain_of(route)).train(self.training)

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        return {f"adapter.{n}": m for n, m in self.adapter.used(domain_of(route)).items()}

    def delegates(self, route: Route | None) -> list[str]:
        domain = domain_of(route)
        if domain not in self.norms:
            raise _no_domain(domain, self.norms.keys())
        return ["conv", f"norms.{domain}"]


AdapterConv = (ParallelAdapterConv2d, SeriesAdapterConv2d)


# ---- walking a module tree -----------------------------------------------------------------------------
def _supported(m: nn.Module) -> bool:
    if not isinstance(m, nn.Conv2d):
        return False
    kh, kw = m.kernel_size
    return kh % 2 == 1 and kw % 2 == 1 and max(kh, kw) > 1


def adaptable_convs(
    module: nn.Module, layers: Sequence[str] | None = None, prefix: str = ""
) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions of ``module`` to adapt, by name (never by position).

    Args:
        module: the network.
        layers: None for every ``nn.Conv2d`` with odd kernel sides larger than 1 (1x1 and even kernels are
            skipped), or names / fnmatch patterns (e.g. ``"layer*.conv2"``): an exact name must be such a
            convolution; a pattern takes the such convolutions it matches, and must match at least one.
        prefix: prepended to the names (for messages and patterns).

    Raises:
        ConfigError: a pattern that matches nothing, a matched layer that cannot hold an adapter, or no
            convolution to adapt at all.
    """
    named = [(f"{prefix}{n}", m) for n, m in module.named_modules() if n]
    if layers is None:
        chosen = [(n, m) for n, m in named if _supported(m)]
    else:
        chosen = []
        seen: set[str] = set()
        for pat in layers:
            hits = [(n, m) for n, m in named if n == pat or fnmatch.fnmatchcase(n, pat)]
            if not hits:
                convs = [n for n, m in named if _supported(m)]
                raise ConfigError(
                    f"layers: '{pat}' matches no module of {type(module).__name__} "
                    f"(convolutions that can be adapted: {convs[:8]}{' ...' if len(convs) > 8 else ''})"
                )
            if any(n == pat for n, _ in hits):  # an exact name must be a layer that can hold an adapter
                check_foldable(hits[0][1], pat)
            else:  # a wildcard pattern takes the matching convolutions that can
                good = [(n, m) for n, m in hits if _supported(m)]
                if not good:
                    check_foldable(hits[0][1], hits[0][0])
                hits = good
            for n, m in hits:
                if n not in seen:
                    seen.add(n)
                    chosen.append((n, m))  # type: ignore[arg-type]
    if not chosen:
        kinds = sorted({type(m).__name__ for _, m in named}) or ["no submodules"]
        raise ConfigError(
            f"{type(module).__name__} has no convolution to adapt: adapters wrap nn.Conv2d layers with an "
            f"odd kernel larger than 1 (found: {', '.join(kinds)})"
        )
    return chosen  # type: ignore[return-value]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def inject_adapters(
    module: nn.Module,
    domains: Sequence[str],
    convs: Sequence[str],
    kind: str = "parallel",
    rank: int | None = None,
    shared: bool = True,
    dropout: Callable[[str], float] | None = None,
    impl: str = "fold",
    norms: bool = True,
) -> None:
    """Wrap the convolutions named ``convs`` in adapters and make every batch norm per domain, in place.

    Args:
        module: a route-aware network (its layers take ``forward(x, route)``).
        domains: the domains.
        convs: names of the convolutions to wrap (see :func:`adaptable_convs`).
        kind: ``"parallel"`` or ``"series"``.
        rank: low-rank factors of the adapters (None: full rank only).
        shared: one low-rank ``beta`` for every domain.
        dropout: the dropout probability of each wrapped convolution's adapter, by name (None: 0).
        impl: the parallel adapters' computation (``"fold"`` or ``"branch"``).
        norms: replace every batch norm by a :class:`DomainBatchNorm` of copies.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if norms:
        for name, m in list(module.named_modules()):
            if isinstance(m, _BatchNorm):
                replace_module(module, name, DomainBatchNorm(m, domains))
    for name in convs:
        conv = module.get_submodule(name)
        check_foldable(conv, name)
        p = dropout(name) if dropout is not None else 0.0
        if kind == "parallel":
            new: nn.Module = ParallelAdapterConv2d(conv, domains, rank, shared, p, impl)  # type: ignore[arg-type]
        else:
            new = SeriesAdapterConv2d(conv, domains, rank, shared, p)  # type: ignore[arg-type]
        replace_module(module, name, new)


def fuse_module(module: nn.Module, domain: str) -> nn.Module:
    """A copy of ``module`` for one domain: every adapter convolution fused, every per-domain batch norm
    replaced by the domain's own, and the bias that a fused series adapter gives its convolution absorbed
    into the batch norm that follows it (:func:`absorb_conv_biases`), so the fused network has exactly the
    plain network's layers. The result holds plain layers only and shares no tensor with ``module``."""
    out = copy.deepcopy(module)
    fused: set[str] = set()
    for name, m in list(out.named_modules()):
        if isinstance(m, AdapterConv):
            replace_module(out, name, m.fuse(domain))
            if isinstance(m, SeriesAdapterConv2d):
                fused.add(name)
        elif isinstance(m, DomainBatchNorm):
            replace_module(out, name, copy.deepcopy(m.norm(domain)))
    absorb_conv_biases(out, fused)
    return out


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batch norm)`` names where the batch norm directly follows the convolution in the forward:
    the pairs a module declares in ``CONV_NORM_PAIRS`` (child names; the backbones' blocks and stems do:
    a basic block's ``conv1 -> bn1``, a pre-activation block's ``conv1 -> bn2``) and consecutive children of
    a plain ``nn.Sequential`` (which runs its children in order). Names alone are not evidence: in a
    pre-activation block ``bn1`` comes *before* ``conv1``."""
    from virtnet.nn.layers import RouteSequential

    pairs = []
    for parent_name, parent in module.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = dict(parent.named_children())
        for conv_name, bn_name in getattr(parent, "CONV_NORM_PAIRS", ()):
            conv, bn = children.get(conv_name), children.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                pairs.append((prefix + conv_name, prefix + bn_name))
        if type(parent) in (nn.Sequential, RouteSequential):
            items = list(children.items())
            for (a, ca), (b, cb) in zip(items, items[1:], strict=False):
                if isinstance(ca, nn.Conv2d) and isinstance(cb, nn.BatchNorm2d):
                    pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def absorb_conv_biases(module: nn.Module, convs: Iterable[str]) -> None:
    """Remove the bias ``d`` of each named convolution that a batch norm follows: ``BN(z + d)`` equals
    ``BN'(z)`` with running mean ``mu - d`` (exact in eval mode; in training the batch mean absorbs
    ``d`` anyway). Convolutions not followed by a batch norm keep their bias."""
    wanted = set(convs)
    for conv_name, bn_name in conv_bn_pairs(module):
        if conv_name not in wanted:
            continue
        conv = module.get_submodule(conv_name)
        bn = module.get_submodule(bn_name)
        if conv.bias is None or bn.running_mean is None:
            continue
        bn.running_mean.sub_(conv.bias)
        new = _conv_like(conv, False)
        new.weight.copy_(conv.weight)
        replace_module(module, conv_name, new)


# ---- plug-in: parallel adapters for any nn.Module ------------------------------------------------------
def _key(name: str) -> str:
    return name.replace(".", "-")


class ParallelAdapters(nn.Module):
    """Parallel adapters, per-domain batch norms and heads for a pretrained ``nn.Module`` left as it is.

    The user's module is not rewritten: :meth:`forward` runs it with ``torch.func.functional_call``,
    substituting, for the domain given as an argument, ``f + diag_L(alpha_t)`` for each adapted kernel
    ``f``, the domain's batch-norm parameters and running statistics for the universal ones (their
    training-mode updates land in the domain's buffers), and the domain's head. The universal tensors are
    frozen (``requires_grad=False``) and never written.

    Example::

        net = torchvision_like_resnet(pretrained=True)
        adapted = ParallelAdapters(net, ["flowers", "cars"], head="fc", num_outputs={"flowers": 102})
        logits = adapted(x, domain="flowers")
        opt = torch.optim.SGD(adapted.domain_parameters("flowers"), lr=0.1)
        deployable = adapted.fuse("flowers")          # a plain copy of net with the adapters folded in

    Args:
        model: the pretrained network (kept by reference, frozen).
        domains: the domains.
        layers: convolutions to adapt (names or fnmatch patterns); None: every ``nn.Conv2d`` with odd
            kernel sides larger than 1.
        norms: give every domain its own copy of every batch norm (initialised from the universal one).
        head: name of an ``nn.Linear`` to make per domain (the classifier), or None.
        num_outputs: outputs of the head per domain; a domain with a different count than the universal
            head gets a freshly initialised one, the others a copy of it.

    Raises:
        ConfigError: no convolution to adapt, a named layer that cannot hold an adapter, a head that is not
            an ``nn.Linear``.
    """

    def __init__(
        self,
        model: nn.Module,
        domains: Sequence[str],
        layers: Sequence[str] | None = None,
        norms: bool = True,
        head: str | None = None,
        num_outputs: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        domains = list(domains)
        if not domains or len(set(domains)) != len(domains):
            raise ConfigError(f"domains must be distinct names, got {domains}")
        self.base = model
        model.requires_grad_(False)
        self.conv_names = [n for n, _ in adaptable_convs(model, layers)]
        self.adapters = nn.ModuleDict()
        for n in self.conv_names:
            conv = model.get_submodule(n)
            bank = AdapterBank(conv.out_channels, conv.in_channels // conv.groups, domains)
            self.adapters[_key(n)] = bank.to(device=conv.weight.device, dtype=conv.weight.dtype)
        self.norm_names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)] if norms else []
        self.norms = nn.ModuleDict()
        for n in self.norm_names:
            bn = copy.deepcopy(model.get_submodule(n)).requires_grad_(True)
            self.norms[_key(n)] = DomainBatchNorm(bn, domains)
        self.head_name = head
        self.heads = nn.ModuleDict()
        if head is not None:
            lin = model.get_submodule(head)
            if not isinstance(lin, nn.Linear):
                raise ConfigError(f"head '{head}' is a {type(lin).__name__}, not an nn.Linear")
            for d in domains:
                n_out = (num_outputs or {}).get(d, lin.out_features)
                if n_out == lin.out_features:
                    new = copy.deepcopy(lin).requires_grad_(True)
                else:
                    new = nn.Linear(lin.in_features, n_out, bias=lin.bias is not None)
                    new = new.to(device=lin.weight.device, dtype=lin.weight.dtype)
                self.heads[d] = new
        elif num_outputs:
            raise ConfigError("num_outputs needs head: the name of the classifier to make per domain")
        self._domains = domains

    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    def _check(self, domain: str) -> None:
        if domain not in self._domains:
            raise _no_domain(domain, self._domains)

    def substitutions(self, domain: str) -> dict[str, torch.Tensor]:
        """The tensors that turn the universal module into ``domain``'s network, by parameter name."""
        self._check(domain)
        subs: dict[str, torch.Tensor] = {}
        for n in self.conv_names:
            conv = self.base.get_submodule(n)
            subs[f"{n}.weight"] = fold_parallel(conv.weight, self.adapters[_key(n)].alpha(domain))
        for n in self.norm_names:
            bn = self.norms[_key(n)].norm(domain)
            for k, t in list(bn.named_parameters()) + list(bn.named_buffers()):
                subs[f"{n}.{k}"] = t
        if self.head_name is not None:
            for k, t in self.heads[domain].named_parameters():
                subs[f"{self.head_name}.{k}"] = t
        return subs

    def forward(self, *args: Any, domain: str, **kwargs: Any) -> Any:
        """The user's module on ``args``/``kwargs`` as ``domain``'s network."""
        return functional_call(self.base, self.substitutions(domain), args, kwargs, strict=False)

    def domain_parameters(self, domain: str) -> list[nn.Parameter]:
        """What adapting ``domain`` trains: its adapters, batch norms and head."""
        self._check(domain)
        params = [self.adapters[_key(n)].alphas[domain] for n in self.conv_names]
        params += [p for n in self.norm_names for p in self.norms[_key(n)].norm(domain).parameters()]
        if self.head_name is not None:
            params += list(self.heads[domain].parameters())
        return params

    @torch.no_grad()
    def fuse(self, domain: str) -> nn.Module:
        """A copy of the user's module (its own class) that is ``domain``'s network: adapters folded into
        the kernel centres, the domain's batch norms and head in place. It shares no tensor with this one."""
        subs = {k: v.detach() for k, v in self.substitutions(domain).items()}
        out = copy.deepcopy(self.base)
        for name, t in subs.items():
            mod_name, _, attr = name.rpartition(".")
            mod = out.get_submodule(mod_name)
            old = getattr(mod, attr)
            if isinstance(old, nn.Parameter):
                setattr(mod, attr, nn.Parameter(t.clone(), requires_grad=False))
            else:
                mod._buffers[attr] = t.clone()
        if self.head_name is not None:
            lin = out.get_submodule(self.head_name)
            lin.out_features = lin.weight.shape[0]
        return out

    @torch.no_grad()
    def unfuse(self, fused: nn.Module, domain: str) -> None:
        """Take ``domain``'s adapters, batch norms and head out of a fused copy (see :meth:`fuse`) into this
        wrapper: ``alpha_t = centre(g) - centre(f)`` per adapted layer. ConfigError when ``fused`` is not a
        fusion of this wrapper's universal module."""
        self._check(domain)
        for n in self.conv_names:
            g = fused.get_submodule(n).weight
            self.adapters[_key(n)].alphas[domain].copy_(unfold_parallel(g, self.base.get_submodule(n).weight))
        for n in self.norm_names:
            src = fused.get_submodule(n)
            self.norms[_key(n)].norm(domain).load_state_dict(src.state_dict())
        if self.head_name is not None:
            self.heads[domain].load_state_dict(fused.get_submodule(self.head_name).state_dict())


__all__ = [
    "AdapterBank",
    "AdapterConv",
    "DomainBatchNorm",
    "KINDS",
    "ParallelAdapterConv2d",
    "ParallelAdapters",
    "SeriesAdapterConv2d",
    "adaptable_convs",
    "bn_affine",
    "check_foldable",
    "domain_of",
    "fold_parallel",
    "fold_series",
    "fuse_module",
    "inject_adapters",
    "rank_limit",
    "replace_module",
    "set_fold_cache",
    "unfold_parallel",
]
