"""Routes that say more: per-slot selections, skipped blocks, a per-instance selection, routes as pytrees
(torch.export and torch.compile accept them), and the routed-layer protocol (plain modules, usage masks,
compact export) on a tiny hand-counted network."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from virtnet.cost import count_parameters
from virtnet.errors import ConfigError
from virtnet.nn import (
    BatchNorm2d,
    Conv2d,
    Linear,
    Route,
    RoutedBlock,
    RoutedLayer,
    RouteSequential,
    UnitPartition,
    compact,
    name_slots,
    usage,
    usage_by_param,
    usage_count,
)


# ---- a tiny routed network: stem, two residual blocks with inner-channel slots, head ---------------------
class Block(RoutedBlock):
    INNER_CHANNELS = ("conv1.out", "bn1", "conv2.in")

    def __init__(self, c: int, p: UnitPartition) -> None:
        super().__init__()
        self.conv1 = Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(c)
        self.conv2 = Conv2d(c, c, 3, padding=1, bias=False)
        self.conv1.set_partitions(p, p)
        self.bn1.set_partition(p)
        self.conv2.set_partitions(p, p)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        if route is not None and route.skips(self.slot):
            return x
        return x + self.conv2(F.relu(self.bn1(self.conv1(x, route), route)), route)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        p = UnitPartition([2, 2])
        self.stem = Conv2d(1, 4, 3, padding=1)
        self.stem.set_partitions(None, p)
        self.blocks = RouteSequential(Block(4, p), Block(4, p))
        self.head = Linear(4, 3)
        self.head.set_partitions(p, None)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        f = self.blocks(self.stem(x, route), route)  # (B, C, H, W)
        return self.head(f.mean((2, 3)), route)


def tiny() -> Tiny:
    torch.manual_seed(0)
    net = Tiny()
    assert name_slots(net) == ["blocks.0", "blocks.1"]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


X = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))


# ---- Route ---------------------------------------------------------------------------------------------
def test_route_is_canonical_immutable_and_hashable_without_its_tensor():
    r = Route("a", (2, 0), "a/2", {"z": (1, 0), "b": ()})
    assert r.units == (0, 2)
    assert r.layers == (("b", ()), ("z", (0, 1)))
    assert r == Route("a", (0, 2), "a/2", (("z", (0, 1)), ("b", ())))
    assert r.select("z") == (0, 1) and r.select("b") == () and r.select("other") == (0, 2)
    assert r.select(None) == (0, 2)
    assert r.skips("b") and not r.skips("z") and not r.skips(None)
    with_instance = r.replace(instance=torch.zeros(4, 2, dtype=torch.long))
    assert with_instance == r and hash(with_instance) == hash(r)
    assert with_instance.static().instance is None
    assert len({r, with_instance, Route("a", (0, 2), "a/2")}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.units = (1,)  # type: ignore[misc]
    # the old three-field routes are unchanged
    old = Route("a", (1, 0), "a/2")
    assert old.layers == () and old.instance is None and old.units == (0, 1)
    assert old.select("anything") == (0, 1)


def test_bad_routes_are_refused():
    with pytest.raises(ConfigError, match="repeated unit"):
        Route("a", (1, 1))
    with pytest.raises(ConfigError, match="repeated unit"):
        Route("a", None, "", {"s": (0, 0)})
    with pytest.raises(ConfigError, match="named twice"):
        Route("a", None, "", (("s", (0,)), ("s", (1,))))
    with pytest.raises(ConfigError, match="instance must be a tensor"):
        Route("a", None, "", (), [[1, 2]])  # type: ignore[arg-type]


def test_route_is_a_pytree_with_the_instance_as_its_only_leaf():
    inst = torch.arange(6).reshape(3, 2)
    r = Route("a", (0,), "a/1", {"blocks.1": ()}, inst)
    leaves, spec = pytree.tree_flatten(r)
    assert len(leaves) == 1 and leaves[0] is inst
    back = pytree.tree_unflatten(leaves, spec)
    assert back == r and back.instance is inst and back.layers == r.layers
    # the spec serialises (torch.export's saved programs need it)
    spec2 = pytree.treespec_loads(pytree.treespec_dumps(spec))
    assert pytree.tree_unflatten(leaves, spec2) == r
    # tree_map reaches the instance only
    doubled = pytree.tree_map(lambda t: t * 2, r)
    assert torch.equal(doubled.instance, inst * 2) and doubled == r


# ---- torch.export and torch.compile accept a route -------------------------------------------------------
class DVNLike(nn.Module):
    """A DVN-like routed module called ``model(x, task, route)`` (private head per route key)."""

    def __init__(self) -> None:
        super().__init__()
        p4, p6 = UnitPartition([2, 2]), UnitPartition([3, 3])
        self.c1 = Conv2d(3, 4, 3, padding=1)
        self.b1 = BatchNorm2d(4)
        self.c2 = Conv2d(4, 6, 3, padding=1)
        self.c1.set_partitions(None, p4)
        self.b1.set_partition(p4)
        self.c2.set_partitions(p4, p6)
        self.heads = nn.ModuleDict({"a/1": nn.Linear(3, 2), "a/2": nn.Linear(6, 2)})

    def forward(self, x: torch.Tensor, task: str, route: Route | None = None) -> torch.Tensor:
        assert route is not None and route.task == task
        y = self.c2(F.relu(self.b1(self.c1(x, route), route)), route).mean((2, 3))  # (B, C)
        if route.instance is not None:  # a per-instance selection reaches the forward as a tensor
            y = y * (1 + route.instance[:, :1].to(y.dtype))
        return self.heads[route.key](y)


@pytest.mark.parametrize("instance", [False, True])
def test_torch_export_accepts_a_route_argument(instance):
    torch.manual_seed(0)
    m = DVNLike().eval()
    x = torch.randn(2, 3, 8, 8)
    inst = torch.tensor([[1, 0], [2, 1]]) if instance else None
    r = Route("a", (1,), "a/1", instance=inst)
    ep = torch.export.export(m, (x, "a", r))
    got = ep.module()(x, "a", r)
    want = m(x, "a", r)
    assert type(want) is torch.Tensor  # nothing traced was cached into the eager module
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if instance:  # the instance is a graph input, not a constant baked into the program
        other = Route("a", (1,), "a/1", instance=torch.tensor([[3, 0], [0, 1]]))
        torch.testing.assert_close(ep.module()(x, "a", other), m(x, "a", other), rtol=0, atol=1e-6)
    # and under no_grad (the eval path, where slices are cached)
    with torch.no_grad():
        m(x, "a", Route("a", (0,), "a/1"))  # a real cache entry exists while tracing
        ep2 = torch.export.export(m, (x, "a", Route("a", (0,), "a/1")))
        torch.testing.assert_close(
            ep2.module()(x, "a", Route("a", (0,), "a/1")),
            m(x, "a", Route("a", (0,), "a/1")),
            rtol=0,
            atol=1e-6,
        )


def test_torch_compile_accepts_a_route_argument():
    torch.manual_seed(0)
    m = DVNLike().eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(m, backend="eager", fullgraph=False)
    for r in (Route("a", (0,), "a/1"), Route("a", (0, 1), "a/2")):
        torch.testing.assert_close(compiled(x, "a", r), m(x, "a", r), rtol=0, atol=1e-6)


# ---- per-slot selections, skipped blocks ----------------------------------------------------------------
def test_name_slots_names_block_inner_sides_after_module_paths():
    net = tiny()
    b0 = net.blocks[0]
    assert b0.slot == "blocks.0" and net.blocks[1].slot == "blocks.1"
    assert b0.conv1.out_slot == "blocks.0" and b0.conv1.in_slot is None
    assert b0.bn1.slot == "blocks.0"
    assert b0.conv2.in_slot == "blocks.0" and b0.conv2.out_slot is None
    assert net.stem.out_slot is None and net.head.in_slot is None
    # explicit blocks, for modules that do not declare INNER_CHANNELS
    seq = nn.Sequential(nn.Sequential(Conv2d(2, 2, 1), Conv2d(2, 2, 1)))
    assert name_slots(seq, {"0": ("0.out", "1.in")}, prefix="net.") == ["net.0"]
    assert seq[0][0].out_slot == "net.0" and seq[0][1].in_slot == "net.0"
    with pytest.raises(ValueError, match="no submodule"):
        name_slots(seq, {"7": ("0.out",)})
    with pytest.raises(ValueError, match="no 'slot'"):
        name_slots(nn.Sequential(nn.Sequential(nn.ReLU())), {"0": ("0",)})


def _manual(net: Tiny, x: torch.Tensor, units, inner) -> torch.Tensor:
    """The tiny network computed by hand on explicit channel lists (None: skip the block)."""
    sel = torch.tensor(units)
    h = F.conv2d(x, net.stem.weight[sel], net.stem.bias[sel], padding=1)
    for blk, ch in zip(net.blocks, inner, strict=True):
        if ch is None:
            continue
        c = torch.tensor(ch)
        t = F.conv2d(h, blk.conv1.weight[c][:, sel], padding=1)
        bn = blk.bn1
        t = F.batch_norm(
            t, bn.running_mean[c], bn.running_var[c], bn.weight[c], bn.bias[c], False, 0.0, bn.eps
        )
        h = h + F.conv2d(F.relu(t), blk.conv2.weight[sel][:, c], padding=1)
    return F.linear(h.mean((2, 3)), net.head.weight[:, sel], net.head.bias)


@pytest.mark.parametrize(
    "route, units, inner, count",
    [
        # default every unit; block 0 at unit 0 inside, block 1 skipped.
        # stem 36 + 4; block 0: conv1 2x4x9, bn1 2+2, conv2 4x2x9; head 4x3 + 3
        (
            Route("a", None, "", {"blocks.0": (0,), "blocks.1": ()}),
            [0, 1, 2, 3],
            [[0, 1], None],
            40 + 148 + 15,
        ),
        # default unit 0; block 1 wider inside (both units).
        # stem 2x9 + 2; block 0: 2x2x9, 2+2, 2x2x9; block 1: 4x2x9, 4+4, 2x4x9; head 2x3 + 3
        (Route("a", (0,), "", {"blocks.1": (0, 1)}), [0, 1], [[0, 1], [0, 1, 2, 3]], 20 + 76 + 152 + 9),
        # the plain routes of today: one unit set everywhere
        (Route("a", (1,), ""), [2, 3], [[2, 3], [2, 3]], 20 + 76 + 76 + 9),
        (Route("a", None, ""), [0, 1, 2, 3], [[0, 1, 2, 3]] * 2, 40 + 296 + 296 + 15),
    ],
)
def test_per_slot_routes_compute_count_and_export_what_they_select(route, units, inner, count):
    net = tiny()
    with torch.no_grad():
        y = net(X, route)
        torch.testing.assert_close(y, _manual(net, X, units, inner), rtol=0, atol=1e-5)
        masks = usage(net, route)
        assert usage_count(masks) == count
        small = compact(net, route)
        assert count_parameters(small) == count
        torch.testing.assert_close(small(X), y, rtol=0, atol=1e-5)
    for i, ch in enumerate(inner):
        if ch is None:  # a skipped block is gone from the export and from the usage
            assert isinstance(small.blocks[i], nn.Identity)
            assert not any(k.startswith(f"blocks.{i}.") for k in masks)
    for m in small.modules():  # plain layers: no partition left
        assert getattr(m, "in_partition", None) is None and getattr(m, "out_partition", None) is None
        assert getattr(m, "partition", None) is None


def test_usage_masks_mark_exactly_the_selected_blocks():
    net = tiny()
    r = Route("a", (0,), "", {"blocks.1": ()})
    m = usage(net, r)
    assert set(m) == {
        "stem.weight",
        "stem.bias",
        "blocks.0.conv1.weight",
        "blocks.0.bn1.weight",
        "blocks.0.bn1.bias",
        "blocks.0.conv2.weight",
        "head.weight",
        "head.bias",
    }
    assert torch.equal(m["stem.bias"], torch.tensor([True, True, False, False]))
    w = m["blocks.0.conv1.weight"]
    assert w.shape == (4, 4, 3, 3) and w.dtype == torch.bool
    assert torch.equal(
        w[:, :, 1, 1], torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]).bool()
    )
    assert torch.equal(m["head.weight"], torch.tensor([[1, 1, 0, 0]] * 3).bool())
    assert bool(m["head.bias"].all())
    by_id = usage_by_param(net, r)
    assert {id(p) for p in [net.stem.weight, net.head.bias]} <= set(by_id)
    assert id(net.blocks[1].conv1.weight) not in by_id
    p, mask = by_id[id(net.stem.bias)]
    assert p is net.stem.bias and torch.equal(mask, m["stem.bias"])
    assert usage_count(by_id) == usage_count(m) == 20 + 76 + 9


def test_a_parameter_reachable_twice_is_counted_once_and_plain_modules_count_whole():
    lin = nn.Linear(3, 2)
    net = nn.Module()
    net.a = lin
    net.b = nn.Sequential(lin, nn.Linear(2, 1, bias=False))
    m = usage(net, Route("t"))
    assert set(m) == {"a.weight", "a.bias", "b.1.weight"}
    assert usage_count(m) == 8 + 2 == count_parameters(net)
    assert usage_count(usage_by_param(net, None)) == 10


class Picky(nn.Module, RoutedLayer):
    """A layer whose usage names a parameter it does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def plain(self, route):
        return None

    def usage(self, route):
        return {"nope": torch.ones(2, dtype=torch.bool)}


def test_a_layer_naming_a_parameter_it_lacks_is_a_clear_error():
    with pytest.raises(ValueError, match="names 'nope'"):
        usage(Picky(), None)


def test_routed_layers_implement_the_protocol():
    net = tiny()
    for m in (net.stem, net.head, net.blocks[0], net.blocks[0].bn1):
        assert isinstance(m, RoutedLayer)
    with pytest.raises(TypeError):
        RoutedLayer()  # type: ignore[abstract]


# ---- inference mode -------------------------------------------------------------------------------------
def test_compact_under_inference_mode_gives_ordinary_tensors():
    net = tiny()
    r = Route("a", (1,), "", {"blocks.0": ()})
    with torch.inference_mode():
        small = compact(net, r)
        y = small(X)
    assert not any(t.is_inference() for t in list(small.parameters()) + list(small.buffers()))
    torch.testing.assert_close(y, net(X, r).detach(), rtol=0, atol=1e-5)
    # and an inference-mode copy of a routed network runs sliced under no_grad (no version counter read)
    with torch.inference_mode():
        import copy

        twin = copy.deepcopy(net)
        assert twin.stem.weight.is_inference()
        torch.testing.assert_close(twin(X, r), y, rtol=0, atol=1e-5)
        torch.testing.assert_close(compact(twin, r)(X), y, rtol=0, atol=1e-5)
