"""Elastic blocks: a backbone block whose inner channels are split into nested groups, one level per
prefix of groups (Deep Elastic Networks, Sec. 3.1 and App. A.1).

A block keeps its input and output width; level ``l`` (0-based, ``0 .. h-1``) runs the first
``widths[l]`` inner channels (a contiguous prefix, so a level's weights are physically a slice of the next
level's). Residual blocks' level 0 has no inner channel: the residual branch is not executed at all
(the block is the identity, or its projection shortcut alone when the shape changes). Plain blocks (a
pair of consecutive VGG / SimpleConvNet convolutions) keep at least one group.

Three ways to run a block, all giving the same outputs in eval mode:

* :meth:`ElasticBlock.run` — one level for the whole batch through physically sliced weights (prefix
  slices, cached contiguous in eval mode): the static path, and what an exported structure runs;
* :meth:`ElasticBlock.grouped` — per-instance levels ``(B,)``: the batch is split by level and each group
  runs :meth:`run` at its level (level-0 groups of an identity block are copied, nothing executes);
* :meth:`ElasticBlock.masked` — per-instance one-hot levels ``(B, h)``: every instance computes the full
  block and the inner channels beyond its level are multiplied by zero (training: any structure per
  instance in one batch, one convolution per layer).

Batch norms: a norm over the inner channels (``bn1`` of a ResNet block, ``bn2`` of a WRN block, the first
norm of a VGG pair) is *shared* by the levels, sliced: channel ``c`` is computed the same way at every
level that has it, so one set of statistics is exact for all of them. A norm over the output of the
convolution that reads the inner channels (ResNet ``bn2``, the second norm of a VGG pair) sees a sum over
a level-dependent number of inputs: it is *private* per level (:class:`LevelNorm`). The norms at block
inputs (WRN's pre-activation ``bn1``, the trunk's final norm) depend on every earlier block's level
(``h^n`` combinations): they are shared. In eval mode every norm uses its running statistics only.

A route drives a block through the routed-layer protocol: the block's slot entry in ``route.layers``
(``(0, ..., k-1)``: the first ``k`` groups) selects a level; ``route.instance`` selects per-instance levels
(a long ``(B, n)`` tensor: grouped; a float ``(B, n, h)`` one-hot tensor: masked), column ``self.index``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from virtnet.errors import ConfigError
from virtnet.nn import Conv2d, Route, RouteSequential
from virtnet.nn.layers import sliced_batch_norm
from virtnet.nn.protocol import RoutedLayer


def _fake(t: torch.Tensor) -> bool:
    """Whether ``t`` is a meta or fake tensor (traced: shapes only, no data)."""
    if type(t) is torch.Tensor:  # the common eager case: a plain tensor on a real device
        return t.device.type == "meta"
    return t.device.type == "meta" or is_fake(t)


def level_widths(channels: int, fractions: list[float], where: str) -> tuple[int, ...]:
    """Inner channels of each level: ``round(f * channels)`` (at least 1 where ``f > 0``), strictly
    increasing, the last ``channels``; ConfigError naming ``where`` when a level would add no channel."""
    widths = []
    for f in fractions:
        c = 0 if f == 0 else max(1, int(round(f * channels)))
        widths.append(min(channels, c))
    widths[-1] = channels
    if any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise ConfigError(
            f"method.level_widths: {where} has {channels} inner channels: levels {list(fractions)} give "
            f"widths {widths}, which do not grow at every level (fewer levels or a wider model)"
        )
    return tuple(widths)


def _affine(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, c: int) -> torch.Tensor:
    """Eval-mode batch norm as its affine map (what torch.export traces for groups that may be empty:
    ``F.batch_norm`` guards on a non-empty batch)."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var[:c] + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight[:c]
    shift = -bn.running_mean[:c] * scale
    if bn.bias is not None:
        shift = shift + bn.bias[:c]
    shape = (1, c) + (1,) * (x.dim() - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def _bn(bn: nn.Module, x: torch.Tensor, c: int | None = None) -> torch.Tensor:
    """Batch norm ``bn`` on its first ``c`` channels (None: all; running statistics updated in place in
    training)."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    c = bn.num_features if c is None else c
    if not bn.training and bn.running_mean is not None and _fake(x):
        return _affine(bn, x, c)
    if c == bn.num_features:
        return bn(x)
    rm = None if bn.running_mean is None else bn.running_mean[:c]
    rv = None if bn.running_var is None else bn.running_var[:c]
    w = None if bn.weight is None else bn.weight[:c]
    b = None if bn.bias is None else bn.bias[:c]
    training = bn.training or rm is None
    momentum = 0.1 if bn.momentum is None else bn.momentum
    if bn.training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    return F.batch_norm(x, rm, rv, w, b, training, momentum, bn.eps)


def _norm_group(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)``; in training, a group of one value per channel (one instance at 1x1) is normalised with
    the running statistics (batch statistics do not exist for it)."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    if bn.training and x[0, 0].numel() * x.shape[0] <= 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


def _seq(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a shortcut (a sequence of layers), its batch norms through :func:`_bn`."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _bn(module, x)
    if isinstance(module, nn.Sequential):
        for m in module:
            x = _seq(m, x)
        return x
    return module(x)


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@torch.no_grad()
def _sliced_conv(conv: nn.Conv2d, out_c: int | None = None, in_c: int | None = None) -> Conv2d:
    """A plain :class:`~virtnet.nn.Conv2d` holding ``conv``'s first ``out_c`` outputs / ``in_c`` inputs."""
    w = conv.weight.detach()
    if out_c is not None:
        w = w[:out_c]
    if in_c is not None:
        w = w[:, :in_c]
    new = Conv2d(
        w.shape[1],
        w.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,
        bias=False,  # type: ignore[arg-type]
    )
    new = new.to(device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    return new.train(conv.training)


def _copy_plain(module: nn.Module) -> nn.Module:
    """A standalone copy of a plain module (routed layers cut for no route)."""
    from virtnet.nn import compact

    return compact(module, None).train(module.training)


class LevelNorm(nn.Module, RoutedLayer):
    """A private batch norm per level of a block (the norm after the convolution that reads the block's
    sliced inner channels). ``norms[l]`` is level ``l``'s; levels without channels have none."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, levels: list[int]) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({str(lv): copy.deepcopy(bn) for lv in levels})

    def norm(self, level: int) -> nn.Module:
        return self.norms[str(level)]

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:  # pragma: no cover
        raise RuntimeError("a LevelNorm is run by its block, at a level")

    def plain(self, route: Route | None) -> nn.Module | None:  # pragma: no cover - cut by the block
        return None

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:  # pragma: no cover
        return {}


class ElasticBlock(nn.Module, RoutedLayer):
    """Base of the elastic blocks (see the module docstring).

    Attributes:
        slot: the block's name in a route's ``layers`` (``"trunk.blocks.<i>"``).
        index: the block's position among the trunk's elastic blocks (column of ``route.instance``).
        widths: inner channels of each level (``widths[0] == 0``: level 0 skips the residual branch).
        groups: groups used at each level (the route selects groups ``0 .. groups[l]-1``).
    """

    residual: bool = True

    def __init__(self, widths: tuple[int, ...], slot: str, index: int) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.groups = (
            tuple(range(len(self.widths))) if self.widths[0] == 0 else tuple(range(1, len(self.widths) + 1))
        )
        self.slot = slot
        self.index = index
        self._slice_cache: dict[Any, Any] = {}

    @property
    def num_levels(self) -> int:
        return len(self.widths)

    # ---- levels from a route ---------------------------------------------------------------------
    def level_of(self, route: Route | None) -> int:
        """The level a static route selects here (its slot's groups; no entry: the top level)."""
        sel = None if route is None else route.select(self.slot)
        if sel is None:
            return self.num_levels - 1
        k = len(sel)
        if tuple(sel) != tuple(range(k)) or k not in self.groups:
            raise ConfigError(
                f"block '{self.slot}': groups {tuple(sel)} are not a level (levels use groups "
                f"{[tuple(range(g)) for g in self.groups]})"
            )
        return self.groups.index(k)

    def route_units(self, level: int) -> tuple[int, ...]:
        """The groups of ``level`` (what a route's ``layers`` entry for this block holds)."""
        return tuple(range(self.groups[level]))

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        inst = None if route is None else route.instance
        if inst is None:
            return self.run(x, self.level_of(route))
        col = inst[:, self.index]
        if col.is_floating_point():
            return self.masked(x, col)
        return self.grouped(x, col)

    # ---- the three paths -------------------------------------------------------------------------
    def run(self, x: torch.Tensor, level: int) -> torch.Tensor:
        raise NotImplementedError

    def is_input_at(self, level: int) -> bool:
        """Whether :meth:`run` at ``level`` returns its input unchanged (a skipped identity block)."""
        return False

    def masked(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grouped(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Per-instance levels ``(B,)``: each level's instances through :meth:`run` at that level."""
        h = self.num_levels
        traced = _fake(x) or _fake(levels)
        if not traced and levels.numel() == 1:  # one instance: its level's plain sliced block
            return self.run(x, int(levels))
        if traced:  # traced (torch.export): every group, no data-dependent branch
            present = list(range(h))
        else:
            counts = torch.bincount(levels, minlength=h).tolist()
            present = [lv for lv in range(h) if counts[lv] > 0]
            if len(present) == 1:  # one structure for the whole batch: the plain sliced block
                return self.run(x, present[0])
        out: torch.Tensor | None = None
        if traced:  # a fresh tensor per group, no in-place write
            for lv in present:
                idx = (levels == lv).nonzero().squeeze(1)
                y = self.run(x.index_select(0, idx), lv)
                if out is None:
                    out = y.new_zeros((x.shape[0], *y.shape[1:]))
                out = out.index_copy(0, idx, y)
            assert out is not None
            return out
        # eager: every row is written once, in place, into one output; an identity block's level-0 rows
        # are the input's rows (copied straight into the output, never gathered nor run)
        if 0 in present and self.is_input_at(0):
            idx = (levels == 0).nonzero().squeeze(1)
            if 2 * idx.numel() >= x.shape[0]:  # most rows skip: one copy of the whole input is cheaper
                out = x.clone()
            else:  # the skipped rows only (gathered and written: two passes over them)
                out = torch.empty_like(x)
                out.index_copy_(0, idx, x.index_select(0, idx))
            present = [lv for lv in present if lv != 0]
        for lv in present:
            idx = (levels == lv).nonzero().squeeze(1)
            y = self.run(x.index_select(0, idx), lv)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, idx, y)
        assert out is not None
        return out

    # ---- helpers -----------------------------------------------------------------------------------
    def _channel_mask(self, onehot: torch.Tensor, channels: int) -> torch.Tensor:
        """``(B, channels, 1, 1)``: 1 on the inner channels each instance's level keeps."""
        levels = torch.tensor(self.widths, device=onehot.device)
        keep = (torch.arange(channels, device=onehot.device)[None, :] < levels[:, None]).to(onehot.dtype)
        return (onehot @ keep)[:, :, None, None]

    def _in_sliced(self, conv: nn.Conv2d, c: int) -> torch.Tensor:
        """``conv``'s weight on its first ``c`` input channels, contiguous (cached in eval mode)."""
        w = conv.weight
        if c == w.shape[1]:
            return w
        if torch.is_grad_enabled() or w.is_inference() or _fake(w):
            return w[:, :c]
        key = (id(conv), c)
        stamp = (w.data_ptr(), w._version)
        hit = self._slice_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        s = w[:, :c].contiguous()
        self._slice_cache[key] = (stamp, s)
        return s

    def _private(self, norm: LevelNorm, o: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The private norm of each instance's level on ``o``; zero for instances at a level without one."""
        levels = onehot.argmax(1)
        out = torch.zeros_like(o)
        for lv in range(self.num_levels):
            if str(lv) not in norm.norms:
                continue
            idx = (levels == lv).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            out = out.index_copy(0, idx, _norm_group(norm.norm(lv), o.index_select(0, idx)))
        return out

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._slice_cache.clear()
        return super()._apply(fn, recurse)

    # ---- the routed-layer protocol ---------------------------------------------------------------
    def delegates(self, route: Route | None) -> list[str]:
        return []

    def usage(self, route: Route | None) -> dict[str, torch.Tensor]:
        """What :meth:`plain` keeps of this block at the route's level."""
        return self.level_usage(self.level_of(route))

    def level_usage(self, level: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plain(self, route: Route | None) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # the new layers' initial weights are replaced
            return self.level_module(self.level_of(route))

    def level_module(self, level: int) -> nn.Module:
        """A standalone module computing this block at ``level`` (physically sliced weights)."""
        raise NotImplementedError


def _prefix_mask(p: torch.Tensor, dim: int, c: int) -> torch.Tensor:
    m = torch.zeros(p.shape, dtype=torch.bool)
    index = [slice(None)] * p.dim()
    index[dim] = slice(0, c)
    m[tuple(index)] = True
    return m


def _full(module: nn.Module | None, prefix: str) -> dict[str, torch.Tensor]:
    if module is None:
        return {}
    return {f"{prefix}{n}": torch.ones(p.shape, dtype=torch.bool) for n, p in module.named_parameters()}


class ShortcutOnly(nn.Module):
    """A skipped post-activation residual block whose shape changes: ``relu(shortcut(x))``."""

    def __init__(self, shortcut: nn.Module) -> None:
        super().__init__()
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x))


class PreActShortcutOnly(nn.Module):
    """A skipped pre-activation residual block whose shape changes: ``shortcut(relu(bn1(x)))``."""

    def __init__(self, bn1: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.bn1 = bn1
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(F.relu(self.bn1(x)))


class ElasticResidual(ElasticBlock):
    """A post-activation basic block (ResNet): ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``
    with the inner channels (conv1's outputs) split into levels; ``bn2`` private per level."""

    def __init__(self, block: nn.Module, widths: tuple[int, ...], slot: str, index: int) -> None:
        super().__init__(widths, slot, index)
        self.conv1, self.bn1, self.conv2 = block.conv1, block.bn1, block.conv2
        self.bn2 = LevelNorm(block.bn2, [lv for lv, w in enumerate(self.widths) if w > 0])
        self.shortcut = block.shortcut
        self.dropout = float(getattr(block, "dropout", 0.0))

    def _identity(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.shortcut is None else _seq(self.shortcut, x)

    def is_input_at(self, level: int) -> bool:
        return self.widths[level] == 0 and self.shortcut is None

    def run(self, x: torch.Tensor, level: int) -> torch.Tensor:
        c = self.widths[level]
        if c == 0:
            return x if self.shortcut is None else F.relu(_seq(self.shortcut, x))
        h = F.relu(_bn(self.bn1, _conv(self.conv1, x, self.conv1.weight[:c]), c))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        o = _bn(self.bn2.norm(level), _conv(self.conv2, h, self._in_sliced(self.conv2, c)))
        return F.relu(o + self._identity(x))

    def masked(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        h = h * self._channel_mask(onehot, h.shape[1])
        o = self._private(self.bn2, self.conv2(h), onehot)
        out = F.relu(o + self._identity(x))
        if self.shortcut is None:  # level 0 of an identity block: exactly x (relu(x) for x >= 0 too)
            skip = onehot[:, 0][:, None, None, None] if self.widths[0] == 0 else None
            if skip is not None:
                out = out * (1 - skip) + x * skip
        return out

    def level_usage(self, level: int) -> dict[str, torch.Tensor]:
        c = self.widths[level]
        used = _full(self.shortcut, "shortcut.")
        if c == 0:
            return used
        used["conv1.weight"] = _prefix_mask(self.conv1.weight, 0, c)
        used["conv2.weight"] = _prefix_mask(self.conv2.weight, 1, c)
        for n, p in self.bn1.named_parameters():
            used[f"bn1.{n}"] = _prefix_mask(p, 0, c)
        used.update(_full(self.bn2.norm(level), f"bn2.norms.{level}."))
        return used

    @torch.no_grad()
    def level_module(self, level: int) -> nn.Module:
        c = self.widths[level]
        if c == 0:
            return nn.Identity() if self.shortcut is None else ShortcutOnly(_copy_plain(self.shortcut))
        # the backbone's own block at the level's inner width: an export runs what a plain ResNet runs
        from virtnet.backbones.resnet import BasicBlock

        new = BasicBlock(self.conv1.in_channels, self.conv2.out_channels, self.conv1.stride[0], self.dropout)
        new.conv1 = _sliced_conv(self.conv1, out_c=c)
        new.bn1 = sliced_batch_norm(self.bn1, torch.arange(c))  # type: ignore[arg-type]
        new.conv2 = _sliced_conv(self.conv2, in_c=c)
        new.bn2 = sliced_batch_norm(self.bn2.norm(level), None)  # type: ignore[arg-type]
        new.shortcut = None if self.shortcut is None else _copy_plain(self.shortcut)
        return new.train(self.training)


class ElasticPreAct(ElasticBlock):
    """A pre-activation basic block (WRN): ``conv2(relu(bn2(conv1 a))) + shortcut``, ``a = relu(bn1 x)``,
    with conv1's outputs split into levels. No norm follows conv2 inside the block, so none is private."""

    def __init__(self, block: nn.Module, widths: tuple[int, ...], slot: str, index: int) -> None:
        super().__init__(widths, slot, index)
        self.bn1, self.conv1, self.bn2, self.conv2 = block.bn1, block.conv1, block.bn2, block.conv2
        self.shortcut = block.shortcut
        self.dropout = float(getattr(block, "dropout", 0.0))

    def is_input_at(self, level: int) -> bool:
        return self.widths[level] == 0 and self.shortcut is None

    def run(self, x: torch.Tensor, level: int) -> torch.Tensor:
        c = self.widths[level]
        if c == 0 and self.shortcut is None:
            return x
        a = F.relu(_bn(self.bn1, x))
        identity = x if self.shortcut is None else self.shortcut(a)
        if c == 0:
            return identity
        h = F.relu(_bn(self.bn2, _conv(self.conv1, a, self.conv1.weight[:c]), c))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return _conv(self.conv2, h, self._in_sliced(self.conv2, c)) + identity

    def masked(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        h = F.relu(self.bn2(self.conv1(a)))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        h = h * self._channel_mask(onehot, h.shape[1])
        identity = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(h) + identity

    def level_usage(self, level: int) -> dict[str, torch.Tensor]:
        c = self.widths[level]
        used: dict[str, torch.Tensor] = {}
        if self.shortcut is not None:
            used.update(_full(self.bn1, "bn1."))
            used.update(_full(self.shortcut, "shortcut."))
        if c == 0:
            return used
        used.update(_full(self.bn1, "bn1."))
        used["conv1.weight"] = _prefix_mask(self.conv1.weight, 0, c)
        used["conv2.weight"] = _prefix_mask(self.conv2.weight, 1, c)
        for n, p in self.bn2.named_parameters():
            used[f"bn2.{n}"] = _prefix_mask(p, 0, c)
        return used

    @torch.no_grad()
    def level_module(self, level: int) -> nn.Module:
        c = self.widths[level]
        if c == 0:
            if self.shortcut is None:
                return nn.Identity()
            return PreActShortcutOnly(_copy_plain(self.bn1), _copy_plain(self.shortcut))
        # the backbone's own block at the level's inner width: an export runs what a plain WRN runs
        from virtnet.backbones.wrn import PreActBlock

        new = PreActBlock(self.conv1.in_channels, self.conv2.out_channels, self.conv1.stride[0], self.dropout)
        new.bn1 = _copy_plain(self.bn1)
        new.conv1 = _sliced_conv(self.conv1, out_c=c)
        new.bn2 = sliced_batch_norm(self.bn2, torch.arange(c))  # type: ignore[arg-type]
        new.conv2 = _sliced_conv(self.conv2, in_c=c)
        new.shortcut = None if self.shortcut is None else _copy_plain(self.shortcut)
        return new.train(self.training)


class ElasticPair(ElasticBlock):
    """Two consecutive convolution layers of a plain network (VGG, SimpleConvNet):
    ``relu(bn_b(conv_b(between(relu(bn_a(conv_a x))))))``, ``between`` the max-pools between them; the
    inner channels are conv_a's outputs; ``bn_b`` private per level; every level keeps one group."""

    residual = False

    def __init__(
        self,
        first: nn.Module,
        between: list[nn.Module],
        second: nn.Module,
        widths: tuple[int, ...],
        slot: str,
        index: int,
    ) -> None:
        super().__init__(widths, slot, index)
        self.conv_a, self.bn_a = first[0], first[1]
        self.between = nn.Sequential(*between)
        self.conv_b = second[0]
        self.bn_b = LevelNorm(second[1], list(range(len(self.widths))))

    def run(self, x: torch.Tensor, level: int) -> torch.Tensor:
        c = self.widths[level]
        h = F.relu(_bn(self.bn_a, _conv(self.conv_a, x, self.conv_a.weight[:c]), c))
        h = self.between(h)
        return F.relu(_bn(self.bn_b.norm(level), _conv(self.conv_b, h, self._in_sliced(self.conv_b, c))))

    def masked(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        h = self.between(F.relu(self.bn_a(self.conv_a(x))))
        h = h * self._channel_mask(onehot, h.shape[1])
        return F.relu(self._private(self.bn_b, self.conv_b(h), onehot))

    def level_usage(self, level: int) -> dict[str, torch.Tensor]:
        c = self.widths[level]
        used = {
            "conv_a.weight": _prefix_mask(self.conv_a.weight, 0, c),
            "conv_b.weight": _prefix_mask(self.conv_b.weight, 1, c),
        }
        for n, p in self.bn_a.named_parameters():
            used[f"bn_a.{n}"] = _prefix_mask(p, 0, c)
        used.update(_full(self.bn_b.norm(level), f"bn_b.norms.{level}."))
        return used

    @torch.no_grad()
    def level_module(self, level: int) -> nn.Module:
        # the backbone's own layers at the level's inner width: conv-BN-ReLU, the max-pools between, and
        # conv-BN-ReLU (the level's private norm), what a plain VGG / SimpleConvNet of that width runs
        from virtnet.backbones.vgg import ConvBNReLU

        c = self.widths[level]
        first = ConvBNReLU(self.conv_a.in_channels, c)
        first[0] = _sliced_conv(self.conv_a, out_c=c)
        first[1] = sliced_batch_norm(self.bn_a, torch.arange(c))
        second = ConvBNReLU(c, self.conv_b.out_channels)
        second[0] = _sliced_conv(self.conv_b, in_c=c)
        second[1] = sliced_batch_norm(self.bn_b.norm(level), None)
        between = [copy.deepcopy(m) for m in self.between]
        return RouteSequential(first, *between, second).train(self.training)


def elasticize(trunk: nn.Module, fractions: list[float] | None, levels: int) -> list[ElasticBlock]:
    """Replace the blocks of ``trunk.blocks`` by elastic blocks, in place; returns them in order.

    ResNet basic blocks and WRN pre-activation blocks become residual elastic blocks; consecutive pairs
    of VGG / SimpleConvNet ``ConvBNReLU`` layers (with the max-pools between them) become plain elastic
    blocks (an unpaired last convolution stays dense). ``fractions``: inner-channel fraction of each
    level (None: residual ``l / (h-1)``, plain ``(l+1) / h``).
    """
    from virtnet.backbones.resnet import BasicBlock
    from virtnet.backbones.vgg import ConvBNReLU
    from virtnet.backbones.wrn import PreActBlock

    blocks = getattr(trunk, "blocks", None)
    if not isinstance(blocks, RouteSequential):
        raise ConfigError(f"model: {type(trunk).__name__} has no blocks Deep Elastic Networks can split")

    def fr(residual: bool) -> list[float]:
        if fractions is not None:
            if not residual and fractions[0] == 0:
                raise ConfigError(
                    "method.level_widths: a plain (VGG / SimpleConvNet) block keeps at least one group: "
                    "the first width must be > 0"
                )
            return list(fractions)
        if residual:
            return [lv / (levels - 1) for lv in range(levels)]
        return [(lv + 1) / levels for lv in range(levels)]

    items = list(blocks)
    out: list[nn.Module] = []
    elastic: list[ElasticBlock] = []
    i = 0
    while i < len(items):
        m = items[i]
        slot = f"trunk.blocks.{len(out)}"
        if isinstance(m, (BasicBlock, PreActBlock)):
            inner = m.conv1.out_channels
            widths = level_widths(inner, fr(True), f"block {len(elastic)}")
            cls = ElasticResidual if isinstance(m, BasicBlock) else ElasticPreAct
            blk: ElasticBlock = cls(m, widths, slot, len(elastic))
            out.append(blk)
            elastic.append(blk)
            i += 1
            continue
        if isinstance(m, ConvBNReLU):
            j = i + 1
            while j < len(items) and not isinstance(items[j], ConvBNReLU):
                if not isinstance(items[j], (nn.MaxPool2d, nn.AvgPool2d)):
                    break
                j += 1
            if j < len(items) and isinstance(items[j], ConvBNReLU):
                inner = m[0].out_channels
                widths = level_widths(inner, fr(False), f"block {len(elastic)}")
                blk = ElasticPair(m, items[i + 1 : j], items[j], widths, slot, len(elastic))
                out.append(blk)
                elastic.append(blk)
                i = j + 1
                continue
        out.append(m)
        i += 1
    if not elastic:
        raise ConfigError(f"model: {type(trunk).__name__} has no blocks Deep Elastic Networks can split")
    trunk.blocks = RouteSequential(*out)
    return elastic


__all__ = [
    "ElasticBlock",
    "ElasticPair",
    "ElasticPreAct",
    "ElasticResidual",
    "LevelNorm",
    "PreActShortcutOnly",
    "ShortcutOnly",
    "elasticize",
    "level_widths",
]
