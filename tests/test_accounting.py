"""Exact memory accounting: usage masks against exported networks (DVN by units, PackNet by ownership,
adapters by the domain's own tensors plus the universal ones), the shared-budget planner over the model
protocol, cost rows, export under inference_mode, torch.export of exported networks."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import BackboneConfig
from virtnet.cost import count_parameters, level_costs, usage_breakdown, used_parameters
from virtnet.methods import make_method
from virtnet.methods.budget import Budget, choose_levels, selection_parameters, selection_usage
from virtnet.nn import BatchNorm2d, Conv2d, Route, RouteSequential, usage, usage_by_param, usage_count
from virtnet.nn.adapters import inject_adapters
from virtnet.protocol import MultiTaskModel

BACKBONE = BackboneConfig(name="resnet", depth=8, width=0.5, feature_size=8)
SPECS = [TaskSpec("a", 1, 8, 3), TaskSpec("b", 3, 12, 4)]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, **options):
    method = make_method(name, options)
    torch.manual_seed(0)
    return method, method.build(SPECS, BACKBONE)


def randomise(model: nn.Module) -> None:
    """No parameter element exactly zero, and batch-norm statistics off their defaults."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    model.eval()


def x_of(spec: TaskSpec, n: int = 2) -> torch.Tensor:
    return torch.randn(n, spec.in_channels, spec.input_size, spec.input_size, generator=torch.Generator())


# ---- DVN: usage by units equals the sliced export -------------------------------------------------------
def test_dvn_usage_equals_the_exported_networks_parameters():
    method, model = build("dvn")
    randomise(model)
    names = dict(model.named_parameters())
    counts = {}
    for s in SPECS:
        for lv in method.levels(model, s.name):
            net = model.task_network(s.name, lv.index)
            exported = method.export(model, s.name, lv.index)
            n = count_parameters(exported)
            assert usage_count(usage(net, lv.route)) == n
            assert usage_count(usage_by_param(net, lv.route)) == n
            masks = model.parameter_usage(s.name, lv.index)
            assert set(masks) <= set(names)
            assert all(m.shape == names[k].shape and m.dtype == torch.bool for k, m in masks.items())
            assert usage_count(masks) == used_parameters(model, s.name, lv.index) == n
            counts[(s.name, lv.index)] = n
    # levels nest, and two tasks' top levels share the trunk: the union is less than the sum
    assert counts[("a", 1)] < counts[("a", 2)]
    both = selection_parameters(method, model, {"a": 2, "b": 2})
    assert max(counts[("a", 2)], counts[("b", 2)]) < both < counts[("a", 2)] + counts[("b", 2)]
    assert both == usage_count(selection_usage(model, {"a": 2, "b": 2}))


def test_dvn_cost_rows_count_usage_and_split_it_exactly():
    method, model = build("dvn")
    rows = level_costs(method, model, "a", (1, 8, 8), latency=False)
    for r in rows:
        assert r["params"] == r["export_params"] == used_parameters(model, "a", r["level"])
        assert r["shared_params"] + r["task_params"] == r["params"]
        assert r["shared_params"] > 0 and r["task_params"] > 0  # trunk units shared, stem and head not
        b = usage_breakdown(model, "a", r["level"])
        assert (b["shared"], b["task_specific"]) == (r["shared_params"], r["task_params"])
    assert rows[-1]["density"] == 1.0


def test_dvn_export_under_inference_mode_and_torch_export_of_the_export():
    method, model = build("dvn")
    randomise(model)
    s = SPECS[1]
    x = x_of(s)
    for lv in method.levels(model, s.name):
        with torch.inference_mode():
            exported = method.export(model, s.name, lv.index)
            y = exported(x)
        assert not any(t.is_inference() for t in list(exported.parameters()) + list(exported.buffers()))
        with torch.no_grad():
            want = model(x, s.name, lv.route)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
        program = torch.export.export(exported, (x,))
        torch.testing.assert_close(program.module()(x), want, rtol=0, atol=1e-5)


def test_torch_export_accepts_dvn_task_network_with_its_route():
    method, model = build("dvn")
    randomise(model)
    s = SPECS[0]
    x = x_of(s)
    lv = method.levels(model, s.name)[0]
    net = model.task_network(s.name, lv.index)
    program = torch.export.export(net, (x, lv.route))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, lv.route), net(x, lv.route), rtol=0, atol=1e-5)


# ---- PackNet: usage by ownership equals the export's nonzero values -------------------------------------
def _packnet_usage_implemented() -> str | None:
    from virtnet.methods.packnet import PackNetModel

    fn = getattr(PackNetModel, "parameter_usage", None)
    if fn is None or getattr(fn, "__isabstractmethod__", False) or inspect.isabstract(PackNetModel):
        return "PackNetModel.parameter_usage is not implemented yet (abstract)"
    return None


def test_packnet_usage_equals_the_exports_nonzero_values():
    why = _packnet_usage_implemented()
    if why:
        pytest.skip(why)
    method, model = build("packnet")
    model.begin_task("a")
    model.prune("a", 0.5)
    model.begin_task("b")
    randomise(model)  # no accidental zeros: the export's zeros are exactly the weights it does not own
    try:
        masks = {t: model.parameter_usage(t) for t in ("a", "b")}
    except NotImplementedError as e:
        pytest.skip(f"PackNetModel.parameter_usage raises NotImplementedError: {e}")
    nonzero = {}
    for t in ("a", "b"):
        exported = method.export(model, t)
        nonzero[t] = sum(int((p != 0).sum()) for p in exported.parameters())
        assert usage_count(masks[t]) == nonzero[t], t
        assert nonzero[t] < count_parameters(exported) or t == "b"  # task a's export is dense with zeros
    # the planner counts by ownership: task b reads what a owns, so together = b alone plus a's own parts
    both = selection_parameters(method, model, {"a": 1, "b": 1})
    assert nonzero["b"] <= both < nonzero["a"] + nonzero["b"]
    rows = level_costs(method, model, "a", (1, 8, 8), latency=False)
    assert rows[0]["params"] == nonzero["a"] and rows[0]["export_params"] > nonzero["a"]


# ---- adapters: the domain's own tensors plus the universal ones -----------------------------------------
@pytest.mark.parametrize("kind, own", [("parallel", 3 * 2), ("series", 3 * 3 + 3 + 3)])
def test_adapter_usage_is_the_domains_own_tensors_plus_the_universal_ones(kind, own):
    torch.manual_seed(0)
    net = RouteSequential(Conv2d(2, 3, 3, padding=1), BatchNorm2d(3))
    inject_adapters(net, ["a", "b"], ["0"], kind=kind)
    universal = 3 * 2 * 9 + 3  # the convolution's weight and bias
    domain_bn = 3 + 3
    m = usage(net, Route("a"))
    assert usage_count(m) == universal + own + domain_bn
    assert not any("b" in k.split(".") for k in m)  # nothing of domain b
    assert "0.adapter.alphas.a" in m and "1.norms.a.weight" in m
    # the fused layer stores fewer values than the domain reads
    from virtnet.nn import compact

    fused = compact(net, Route("a"))
    assert count_parameters(fused) == universal + domain_bn  # a fused convolution, with its bias
    x = torch.randn(2, 2, 5, 5)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x, Route("a")), rtol=1e-5, atol=1e-5)


# ---- the planner over the protocol, with a hand-made model ---------------------------------------------
class FakeModel(nn.Module, MultiTaskModel):
    """Two tasks, two levels each; a trunk of 10 elements, a stem of 3 (a) and of 4 (b) elements."""

    READS = {("a", 1): range(0, 4), ("a", 2): range(0, 10), ("b", 1): range(2, 7), ("b", 2): range(0, 10)}

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Parameter(torch.zeros(10))
        self.stems = nn.ParameterDict({"a": nn.Parameter(torch.zeros(3)), "b": nn.Parameter(torch.zeros(4))})

    @property
    def tasks(self) -> list[str]:
        return ["a", "b"]

    def spec(self, task):
        return TaskSpec(task, 1, 4, 2)

    def forward(self, x, task, route=None):
        raise NotImplementedError

    def levels(self, task):
        return [1, 2]

    def task_network(self, task, level=None):
        raise NotImplementedError

    def parameter_usage(self, task, level=None):
        trunk = torch.zeros(10, dtype=torch.bool)
        trunk[list(self.READS[(task, level or 2)])] = True
        return {"trunk": trunk, f"stems.{task}": torch.ones(3 if task == "a" else 4, dtype=torch.bool)}


class FakeMethod:
    name = "fake"

    def levels(self, model, task):
        from virtnet.methods.base import Level

        return [Level(i, f"level {i}", None) for i in model.levels(task)]


def test_selection_parameters_count_the_union_of_the_protocols_usage():
    model, method = FakeModel(), FakeMethod()
    assert selection_parameters(method, model, {"a": 1}) == 4 + 3
    assert selection_parameters(method, model, {"a": 1, "b": 1}) == 7 + 3 + 4  # trunk 0..6 once
    assert selection_parameters(method, model, {"a": 2, "b": 1}) == 10 + 3 + 4
    assert selection_parameters(method, model, {"a": 2, "b": 2}) == 17
    acc = {("a", 1): 50.0, ("a", 2): 60.0, ("b", 1): 70.0, ("b", 2): 71.0}
    shapes = {"a": (1, 4, 4), "b": (1, 4, 4)}
    out = choose_levels(method, model, ["a", "b"], Budget("params", 14), acc, shapes)
    assert out["levels"] == {"a": 1, "b": 1} and out["cost"] == 14
    out = choose_levels(method, model, ["a", "b"], Budget("params", 17), acc, shapes)
    assert out["levels"] == {"a": 2, "b": 2} and out["cost"] == 17  # b's level 2 shares a's trunk: free
    b = usage_breakdown(model, "b", 1)
    assert b == {"shared": 5, "task_specific": 4, "total": 9}
