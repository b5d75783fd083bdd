"""The shared-budget planner against brute force: random small cases (tasks x levels x budgets) on fake
models implementing the model protocol with parameters shared between tasks, and a real DVN model.
Shared parameters must count once; the planner must find the brute-force optimum (same tie rule: the
largest summed accuracy, then the smallest cost, then the larger levels)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from virtnet.backbones.registry import BackboneConfig
from virtnet.errors import BudgetError, ConfigError, TaskError
from virtnet.export.planner import Planner, parse_total_budget, plan_levels
from virtnet.methods import make_method
from virtnet.protocol import MultiTaskModel, TaskSpec, union_usage, usage_count


class FakeModel(nn.Module, MultiTaskModel):
    """Tasks with levels whose usage masks over a few shared tensors are given by hand (or at random)."""

    def __init__(
        self, usage: dict[tuple[str, int], dict[str, torch.Tensor]], shapes: dict[str, tuple]
    ) -> None:
        super().__init__()
        self._usage = usage
        self._tasks = list(dict.fromkeys(t for t, _ in usage))
        self.weights = nn.ParameterDict(
            {
                n: nn.Parameter(
                    torch.zeros(shape, dtype=torch.float16 if n.startswith("h") else torch.float32)
                )
                for n, shape in shapes.items()
            }
        )

    @property
    def tasks(self) -> list[str]:
        return self._tasks

    def spec(self, task: str) -> TaskSpec:
        self.check_task(task)
        return TaskSpec(task, 1, 4, 2)

    def levels(self, task: str) -> list[int]:
        self.check_task(task)
        return sorted(lv for t, lv in self._usage if t == task)

    def forward(self, x, task, route=None):  # pragma: no cover - not used by the planner
        return x.flatten(1)[:, :2]

    def task_network(self, task, level=None):  # pragma: no cover
        return nn.Identity()

    def parameter_usage(self, task: str, level: int | None = None) -> dict[str, torch.Tensor]:
        self.check_task(task)
        return {f"weights.{k}": v for k, v in self._usage[(task, level or max(self.levels(task)))].items()}


def random_model(rng: random.Random) -> FakeModel:
    shapes = {
        "w0": (rng.randint(2, 6), rng.randint(2, 6)),
        "w1": (rng.randint(3, 12),),
        "h2": (rng.randint(2, 9),),
    }
    usage = {}
    for ti in range(rng.randint(1, 4)):
        n_levels = rng.randint(1, 4)
        nested = rng.random() < 0.5
        prev: dict[str, torch.Tensor] | None = None
        for lv in range(1, n_levels + 1):
            masks = {}
            for n, shape in shapes.items():
                if rng.random() < 0.25:
                    continue
                g = torch.Generator().manual_seed(rng.randint(0, 10**6))
                m = torch.rand(shape, generator=g) < rng.random()
                if nested and prev is not None and n in prev:
                    m = m | prev[n]
                masks[n] = m
            if nested and prev is not None:
                for n, m in prev.items():
                    masks.setdefault(n, m.clone())
            usage[(f"t{ti}", lv)] = masks
            prev = masks
    return FakeModel(usage, shapes)


def brute_force(model, tasks, budget, accuracy, elem_size=None):
    b = parse_total_budget(budget)
    names = dict(model.named_parameters())
    best = None
    for combo in itertools.product(*(model.levels(t) for t in tasks)):
        sel = dict(zip(tasks, combo, strict=True))
        union = union_usage([model.parameter_usage(t, lv) for t, lv in sel.items()])
        if b.kind == "params":
            cost = usage_count(union)
        else:
            cost = sum(int(m.sum()) * names[k].element_size() for k, m in union.items())
        if cost > b.value:
            continue
        acc = sum(accuracy[(t, lv)] for t, lv in sel.items())
        key = (acc, -cost, combo)
        if best is None or key > best[0]:
            best = (key, sel, cost)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_planner_matches_brute_force_on_random_cases(seed):
    rng = random.Random(seed)
    model = random_model(rng)
    tasks = list(model.tasks)
    accuracy = {(t, lv): float(rng.randint(0, 20)) for t in tasks for lv in model.levels(t)}  # ties happen
    planner = Planner(model, accuracy)
    everything = usage_count(union_usage([model.parameter_usage(t, max(model.levels(t))) for t in tasks]))
    for kind in ("params", "bytes"):
        top = everything * (4 if kind == "bytes" else 1) + 1
        for value in sorted({rng.randint(1, top) for _ in range(6)} | {top}):
            budget = f"{kind}={value}"
            want = brute_force(model, tasks, budget, accuracy)
            if want is None:
                with pytest.raises(BudgetError, match="no combination"):
                    planner.plan(budget, tasks)
                continue
            got = planner.plan(budget, tasks)
            assert got.levels == want[1], (seed, budget)
            assert got.score == pytest.approx(want[0][0])
            assert (got.params if kind == "params" else got.bytes) == want[2] <= value


def test_shared_parameters_count_once():
    shared = torch.ones(4, 4, dtype=torch.bool)
    own_a = torch.tensor([True, False, False])
    own_b = torch.tensor([False, True, True])
    model = FakeModel(
        {("a", 1): {"w0": shared, "w1": own_a}, ("b", 1): {"w0": shared, "w1": own_b}},
        {"w0": (4, 4), "w1": (3,)},
    )
    planner = Planner(model)
    assert planner.cost({"a": 1}) == 17 and planner.cost({"b": 1}) == 18
    assert planner.cost({"a": 1, "b": 1}) == 16 + 3  # the shared 16 once, not 32
    assert planner.plan("params=19", ["a", "b"]).levels == {"a": 1, "b": 1}
    assert planner.cost({"a": 1, "b": 1}, "bytes") == 19 * 4


def test_planner_on_a_real_dvn_model_matches_brute_force():
    method = make_method("dvn", {"num_units": 3})
    specs = [TaskSpec("a", 1, 8, 3), TaskSpec("b", 3, 8, 4), TaskSpec("c", 1, 8, 2)]
    torch.manual_seed(0)
    model = method.build(specs, BackboneConfig(name="resnet", depth=8, width=0.25))
    rng = random.Random(1)
    tasks = ["a", "b", "c"]
    accuracy = {(t, lv): rng.uniform(50, 90) + 5 * lv for t in tasks for lv in model.levels(t)}
    planner = Planner(model, accuracy)
    top = planner.cost({t: max(model.levels(t)) for t in tasks})
    separate = sum(planner.cost({t: max(model.levels(t))}) for t in tasks)
    assert top < separate  # the units are shared by the tasks: counted once
    for frac in (0.2, 0.35, 0.5, 0.7, 0.9, 1.0):
        budget = f"params={int(top * frac)}"
        want = brute_force(model, tasks, budget, accuracy)
        if want is None:
            with pytest.raises(BudgetError):
                planner.plan(budget, tasks)
            continue
        got = planner.plan(budget, tasks)
        assert got.levels == want[1] and got.params == want[2]
    # re-planning with fewer tasks frees memory for the others
    small = planner.plan(f"params={int(top * 0.5)}", ["a", "b"])
    assert sum(small.levels.values()) >= 2


def test_without_accuracy_the_largest_levels_win():
    method = make_method("dvn", {"num_units": 2})
    model = method.build(
        [TaskSpec("a", 1, 8, 3), TaskSpec("b", 1, 8, 3)], BackboneConfig(name="resnet", depth=8)
    )
    p = plan_levels(model, ["a", "b"], "params=1e9")
    assert p.levels == {"a": 2, "b": 2} and p.objective == "level fraction"


def test_bad_input_is_one_line():
    method = make_method("dvn", {"num_units": 2})
    model = method.build([TaskSpec("a", 1, 8, 3)], BackboneConfig(name="resnet", depth=8, width=0.25))
    planner = Planner(model)
    with pytest.raises(BudgetError, match=r"the smallest levels need params=") as e:
        planner.plan("params=10", ["a"])
    assert "\n" not in str(e.value)
    with pytest.raises(TaskError, match="unknown task 'zz'"):
        planner.plan("params=1e6", ["a", "zz"])
    for bad in ("params=-3", "memory=5", "bytes=5XB", "params=abc"):
        with pytest.raises(BudgetError):
            parse_total_budget(bad)
    assert parse_total_budget("bytes=2MiB").value == 2 * 1024**2
    with pytest.raises(ConfigError, match="FLOPs"):
        planner.plan("flops=1e9", ["a"])
    with pytest.raises(ConfigError, match="no accuracy"):
        Planner(model, {("a", 1): 1.0}).plan("params=1e9", ["a"])
