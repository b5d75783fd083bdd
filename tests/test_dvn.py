"""Deep Virtual Networks: units, hierarchies, equality with dense and exported networks, eq. 3, eq. 5,
sequential distillation, NestedNet, grouped PackNet, budgets, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_taskset

from virtnet import api
from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import BackboneConfig, build_multitask
from virtnet.cost import count_parameters
from virtnet.errors import BudgetError, ConfigError, DataError, TaskError
from virtnet.methods import make_method
from virtnet.methods.budget import Budget, choose_level, level_costs, parse_budget, selection_parameters
from virtnet.methods.dvn import level_added, level_units, rule_order, rule_orders
from virtnet.nn.layers import _Sliced
from virtnet.train import TrainConfig, Trainer

BACKBONE = BackboneConfig(name="resnet", depth=8, width=0.5, feature_size=8)
SPECS = [TaskSpec("a", 1, 8, 3), TaskSpec("b", 3, 12, 4)]


def build(name="dvn", specs=SPECS, backbone=BACKBONE, seed=0, **options):
    method = make_method(name, options)
    torch.manual_seed(seed)
    return method, method.build(specs, backbone)


def trained_bn(method, model, specs=SPECS, steps=3):
    """Move every batch norm's statistics off their defaults so equality tests see them."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            for s in specs:
                x = torch.randn(8, s.in_channels, s.input_size, s.input_size)
                for lv in method.levels(model, s.name):
                    model(x, s.name, lv.route)
    model.eval()


# ---- units and orders ------------------------------------------------------------------------------------
def test_eq3_example_k3():
    # the paper's k = 3 example, 1-based: task 1 [1,2,3], task 2 [2,1,3], task 3 [3,2,1]
    assert rule_orders(3, 3) == [[0, 1, 2], [1, 0, 2], [2, 1, 0]]
    h = [[level_units(o, lv) for lv in (1, 2, 3)] for o in rule_orders(3, 3)]
    assert h[0] == [(0,), (0, 1), (0, 1, 2)]
    assert h[1] == [(1,), (0, 1), (0, 1, 2)]
    assert h[2] == [(2,), (1, 2), (0, 1, 2)]
    # S(i, j): the level at which unit i joins task j's hierarchy
    assert [level_added(rule_orders(3, 3)[1], u) for u in range(3)] == [2, 1, 3]


def test_rule_generalises_to_any_k():
    assert rule_order(2, 5) == [2, 1, 0, 3, 4]
    assert rule_orders(4, 4) == [[0, 1, 2, 3], [1, 0, 2, 3], [2, 1, 0, 3], [3, 2, 1, 0]]
    assert rule_orders(2, 4) == [[0, 1, 2, 3], [2, 1, 0, 3]]  # n != k: task j starts at floor(j k / n)
    for orders in (rule_orders(5, 5), rule_orders(3, 7)):
        for o in orders:
            assert sorted(o) == list(range(len(o)))


def test_units_are_disjoint_cover_channels_and_levels_nest():
    method, model = build()
    for name, m in model.named_modules():
        if isinstance(m, _Sliced):
            for p in (m.in_partition, m.out_partition):
                if p is None:
                    continue
                idx = torch.cat([p.indices((u,)) for u in range(p.num_units)])
                assert torch.equal(idx.sort().values, torch.arange(p.channels)), name
    for s in SPECS:
        levels = method.levels(model, s.name)
        assert [lv.index for lv in levels] == [1, 2]
        for lo, hi in zip(levels, levels[1:], strict=False):
            assert set(lo.route.units) < set(hi.route.units)


# ---- equalities -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backbone",
    [
        BACKBONE,
        BackboneConfig(name="wrn", depth=10, widen_factor=1, width=1.0, feature_size=8),
        BackboneConfig(name="vgg", depth=11, width=0.125, feature_size=8),
        BackboneConfig(name="simpleconvnet", width=0.25, feature_size=8),
    ],
)
def test_virtual_forward_equals_dense_network_and_export(backbone):
    method, model = build(backbone=backbone, num_units=2)
    trained_bn(method, model)
    k = 2
    for s in SPECS:
        x = torch.randn(5, s.in_channels, s.input_size, s.input_size)
        for lv in method.levels(model, s.name):
            with torch.no_grad():
                virtual = model(x, s.name, lv.route)
                exported = method.export(model, s.name, lv.index)
                # a plain network of the level's width, loaded with the sliced weights
                plain_cfg = backbone.model_copy(update={"width": backbone.width * lv.index / k})
                if backbone.hidden is None and backbone.name == "simpleconvnet":
                    plain_cfg = plain_cfg.model_copy(
                        update={
                            "hidden": [
                                int(exported.trunk.fc1.out_features),
                                int(exported.trunk.fc2.out_features),
                            ]
                        }
                    )
                dense = build_multitask(plain_cfg, [s]).task_network(s.name)
                dense.load_state_dict(exported.state_dict())
                dense.eval()
                assert torch.allclose(dense(x), virtual, atol=1e-5), (s.name, lv.index)
                assert torch.allclose(exported(x), virtual, atol=1e-5), (s.name, lv.index)


def test_level_output_unchanged_when_weights_outside_its_units_change():
    method, model = build()
    trained_bn(method, model)
    lv = method.levels(model, "a")[0]  # unit 0 only
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = model(x, "a", lv.route).clone()
        for m in model.trunk.modules():
            if isinstance(m, _Sliced) and m.out_partition is not None:
                m.weight[m.out_partition.indices((1,))] += 1.0  # every weight producing unit 1
                if m.in_partition is not None:
                    m.weight[:, m.in_partition.indices((1,))] -= 2.0  # and every weight reading it
        assert torch.equal(model(x, "a", lv.route), before)


def test_a_unit_gets_gradient_only_from_levels_that_contain_it():
    """Eq. 5: the loss of level l of task j moves only the weight blocks between units of that level."""
    method, model = build(num_units=2)
    model.train()
    x = torch.randn(6, 1, 8, 8)
    for lv in method.levels(model, "a"):
        model.zero_grad(set_to_none=False)
        model(x, "a", lv.route).square().sum().backward()
        inside = set(lv.route.units)
        checked = 0
        for m in model.trunk.modules():
            if not (isinstance(m, _Sliced) and m.out_partition is not None and m.in_partition is not None):
                continue
            g = m.weight.grad
            for uo in range(2):
                for ui in range(2):
                    block = g[m.out_partition.indices((uo,))][:, m.in_partition.indices((ui,))]
                    if uo in inside and ui in inside:
                        assert block.abs().sum() > 0
                    else:
                        assert torch.equal(block, torch.zeros_like(block))
                        checked += 1
        assert checked > 0 or inside == {0, 1}


def test_save_and_load_give_identical_outputs(tmp_path):
    ts = make_taskset(shapes=((1, 8), (3, 12)))
    data = {
        "tasks": [
            {"name": "t0", "dataset": "synthetic", "options": {"num_classes": 3, "size": 8}},
            {"name": "t1", "dataset": "synthetic", "options": {"num_classes": 3, "size": 12, "channels": 3}},
        ]
    }
    cfg = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "data": data,
        "model": BACKBONE.model_dump(),
        "method": {"name": "dvn"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False},
    }
    run = api.train(cfg, taskset=ts)
    loaded = api.load(run.out_dir / "model.json")
    x = torch.randn(3, 1, 8, 8)
    run.model.eval()
    for lv in run.method.levels(run.model, "t0"):
        with torch.no_grad():
            assert torch.equal(run.model(x, "t0", lv.route), loaded.model(x, "t0", lv.route))
    path = api.export_network(loaded, "t0", 1, tmp_path / "small")
    small = api.load_exported(path)
    with torch.no_grad():
        assert torch.equal(small(x), loaded.model(x, "t0", loaded.method.levels(loaded.model, "t0")[0].route))
    assert count_parameters(small) < count_parameters(loaded.method.export(loaded.model, "t0", 2))


def test_eval_mode_slices_are_cached_and_refreshed_when_weights_change():
    method, model = build()
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    r = method.levels(model, "a")[0].route
    with torch.no_grad():
        y1 = model(x, "a", r)
        conv = next(m for m in model.trunk.modules() if isinstance(m, _Sliced) and m.in_partition is not None)
        assert r.units in conv._slice_cache
        assert torch.equal(model(x, "a", r), y1)
        conv.weight.mul_(2.0)  # an in-place change bumps the version: the cache must not serve stale slices
        assert not torch.equal(model(x, "a", r), y1)


# ---- learning ---------------------------------------------------------------------------------------------
def cfg(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.05, progress=False, eval_every=0, checkpoint_every=0)
    base.update(kw)
    return TrainConfig(**base)


def test_cached_slices_keep_the_channels_last_layout():
    """A channels_last network must get channels_last slices: mixed layouts take a slower convolution."""
    method, model = build()
    trained_bn(method, model)
    x = torch.randn(2, 1, 8, 8)
    r = method.levels(model, "a")[0].route
    with torch.no_grad():
        y = model(x, "a", r)
        model.to(memory_format=torch.channels_last)
        y_cl = model(x.contiguous(memory_format=torch.channels_last), "a", r)
    assert torch.allclose(y, y_cl, atol=1e-5)
    sliced = [
        m._slice_cache[r.units][1]
        for m in model.trunk.modules()
        if isinstance(m, torch.nn.Conv2d) and isinstance(m, _Sliced) and r.units in m._slice_cache
    ]
    big = [w for w in sliced if w.shape[-1] > 1]
    assert big and all(w.is_contiguous(memory_format=torch.channels_last) for w in big)
    assert not any(w.is_contiguous() for w in big)


def test_joint_learning_sums_every_level_of_every_task():
    ts = make_taskset()
    method, model = build(specs=api.task_specs(ts))
    from virtnet.data.loader import MultiTaskLoader

    batches = next(MultiTaskLoader(ts, 8, 0).iterate(0))
    out = method.training_step(model, batches, method.phases(ts.names)[0])
    keys = sorted(k for k in out if k.startswith("loss/"))
    assert keys == ["loss/t0@1", "loss/t0@2", "loss/t1@1", "loss/t1@2"]
    assert torch.allclose(out["loss"], sum(out[k] for k in keys))
    Trainer(method, model, ts, cfg(epochs=6), 0, None, log=lambda s: None).fit()
    from virtnet.train import evaluate

    for r in evaluate(method, model, ts):
        assert r["accuracy"] > 60, r  # 3 classes


def test_sequential_distills_towards_the_old_network():
    ts = make_taskset()
    method, model = build(specs=api.task_specs(ts), mode="sequential")
    phases = method.phases(ts.names)
    assert [p.tasks for p in phases] == [["t0"], ["t1"]]
    tr = Trainer(method, model, ts, cfg(epochs=3), 0, None, log=lambda s: None)
    tr._run_phase(phases[0], None)
    assert [lv.index for lv in method.levels(model, "t0")] == [1]  # one unit so far
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        old = model(x, "t0", model.route("t0", 1)).clone()
    method.on_phase_start(model, phases[1])
    assert int(model.active_units) == 2
    assert [lv.index for lv in method.levels(model, "t0")] == [1, 2]
    with torch.no_grad():  # the teacher is the old network: its outputs are the targets
        assert torch.equal(method._teacher(x, "t0", method._teacher.route("t0", 1)), old)
    from virtnet.data.loader import MultiTaskLoader
    from virtnet.methods.common.distill import distillation_loss

    xb = next(MultiTaskLoader(ts, 24, 0, augment=False).iterate(0))["t1"].x  # the new task's images
    teacher = method._teacher

    def kl(level: int) -> float:
        """Distillation loss minus the targets' entropy: 0 when the level reproduces the old outputs."""
        model.eval()
        with torch.no_grad():
            t = teacher(xb, "t0", teacher.route("t0", 1))
            own = distillation_loss(t, t, 2.0)
            return float(distillation_loss(model(xb, "t0", model.route("t0", level)), t, 2.0) - own)

    before = {lv: kl(lv) for lv in (1, 2)}
    tr._run_phase(phases[1], None)
    after = {lv: kl(lv) for lv in (1, 2)}
    assert before[1] == pytest.approx(0.0, abs=1e-6)  # level 1 starts as the old network itself
    assert after[2] < before[2]  # the new level of the old task learns the old outputs
    with torch.no_grad():
        assert torch.equal(teacher(x, "t0", teacher.route("t0", 1)), old)
    records = [r for r in tr.history if r.get("event") == "train"]
    assert {"distill/t0@1", "distill/t0@2", "loss/t1@1", "loss/t1@2"} <= set(records[-1])


def test_sequential_old_bn_recorded_keeps_the_old_levels_statistics_and_later_rate():
    from virtnet.data.loader import MultiTaskLoader
    from virtnet.methods.common.distill import task_norms

    ts = make_taskset()
    for old_bn in ("recorded", "batch", "batch_keep"):
        method, model = build(specs=api.task_specs(ts), mode="sequential", old_bn=old_bn, later_lr_scale=0.25)
        phases = method.phases(ts.names)
        tr = Trainer(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None)
        tr._run_phase(phases[0], None)
        assert [g.get("lr_scale", 1.0) for g in method.param_groups(model, phases[0])] == [1.0]
        method.on_phase_start(model, phases[1])
        assert [g["lr_scale"] for g in method.param_groups(model, phases[1])] == [0.25]
        norms = {k: task_norms(model.trunk, k) + task_norms(model.stem("t0"), k) for k in ("t0/1", "t0/2")}
        before = {k: [bn.running_mean.clone() for bn in v] for k, v in norms.items()}
        model.train()
        batches = next(MultiTaskLoader(ts, 8, 0).iterate(0))
        method.training_step(model, {"t1": batches["t1"]}, phases[1])["loss"].backward()  # no in-place error
        moved = {
            k: any(not torch.equal(a, bn.running_mean) for a, bn in zip(before[k], v, strict=True))
            for k, v in norms.items()
        }
        # the old task's recorded level keeps its statistics with "recorded" and "batch_keep"; its new level
        # (no statistics recorded yet) follows the new data in every mode
        assert moved == {"t0/1": old_bn == "batch", "t0/2": True}


def test_sequential_teacher_bn_batch_matches_the_student_at_the_start():
    from virtnet.data.loader import MultiTaskLoader

    ts = make_taskset()
    for teacher_bn, zero in (("batch", True), ("recorded", False)):
        method, model = build(specs=api.task_specs(ts), mode="sequential", teacher_bn=teacher_bn)
        phases = method.phases(ts.names)
        tr = Trainer(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None)
        tr._run_phase(phases[0], None)
        method.on_phase_start(model, phases[1])
        model.train()
        b = next(MultiTaskLoader(ts, 16, 0, augment=False).iterate(0))["t1"]
        out = method.training_step(model, {"t1": b}, phases[1])
        with torch.no_grad():  # the distillation term minus the target's entropy: 0 when they agree
            method._teacher.train()
            t = method._teacher(b.x, "t0", method._teacher.route("t0", 1))
            from virtnet.methods.common.distill import distillation_loss

            own = distillation_loss(t, t, 2.0)
        gap = float(out["distill/t0@1"] - own)
        assert (abs(gap) < 1e-5) == zero, (teacher_bn, gap)


def test_sequential_warmup_leaves_the_old_levels_bit_identical_then_distills():
    ts = make_taskset()
    method, model = build(specs=api.task_specs(ts), mode="sequential", warmup_epochs=1)
    phases = method.phases(ts.names)
    assert [p.name for p in phases] == ["task-t0", "warmup-t1", "task-t1"]
    assert phases[1].info["epochs"] == 1
    tr = Trainer(
        method, model, ts, cfg(epochs=2, weight_decay=0.05, momentum=0.9), 0, None, log=lambda s: None
    )
    tr._run_phase(phases[0], None)
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        old = model(x, "t0", model.route("t0", 1)).clone()
        new_before = model(x, "t1", model.route("t1", 2)).clone()
    tr._run_phase(phases[1], None)
    assert int(model.active_units) == 2
    warm = [r for r in tr.history if r.get("event") == "train" and r.get("phase") == "warmup-t1"]
    assert "distill/t0@2" in warm[-1] and "distill/t0@1" not in warm[-1]  # only the level the unit adds
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, "t0", model.route("t0", 1)), old)  # weight decay and momentum included
        assert not torch.equal(model(x, "t1", model.route("t1", 2)), new_before)  # the new task learned
    tr._run_phase(phases[2], None)
    records = [r for r in tr.history if r.get("event") == "train"]
    assert "distill/t0@1" in records[-1]
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(x, "t0", model.route("t0", 1)), old)  # eq. 6 trains every unit


def test_grouped_packnet_leaves_earlier_tasks_bit_identical():
    ts = make_taskset()
    method, model = build("packnet-grouped", specs=api.task_specs(ts))
    assert [lv.index for lv in method.levels(model, "t0")] == [1]
    assert [lv.index for lv in method.levels(model, "t1")] == [2]
    phases = method.phases(ts.names)
    tr = Trainer(
        method, model, ts, cfg(epochs=2, weight_decay=0.05, momentum=0.9), 0, None, log=lambda s: None
    )
    tr._run_phase(phases[0], None)
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        before = method.predict(model, x, "t0").clone()
    tr._run_phase(phases[1], None)
    model.eval()
    with torch.no_grad():
        assert torch.equal(method.predict(model, x, "t0"), before)


def test_nestednet_gives_task_i_level_i_of_one_order():
    method, model = build("nestednet", specs=[TaskSpec("a", 1, 8, 3), TaskSpec("b", 1, 8, 3)])
    assert model.order("a") == model.order("b") == [0, 1]
    assert [lv.index for lv in method.levels(model, "a")] == [1]
    assert [lv.index for lv in method.levels(model, "b")] == [2]
    method, model = build("nestednet", nested="single_task")
    assert [lv.index for lv in method.levels(model, "a")] == [1, 2]


# ---- budgets ----------------------------------------------------------------------------------------------
def test_budgets_choose_the_largest_level_that_fits():
    method, model = build()
    costs = level_costs(method, model, "a", (1, 8, 8))
    assert costs[0].params < costs[1].params and costs[1].density == 1.0
    assert choose_level(costs, Budget("params", costs[1].params), "a").level == 2
    assert choose_level(costs, Budget("params", costs[1].params - 1), "a").level == 1
    assert choose_level(costs, parse_budget("density=50%"), "a").level == 1
    assert choose_level(costs, Budget("flops", costs[0].flops), "a").level == 1
    with pytest.raises(BudgetError, match="task 'a': no level fits the budget params=10"):
        choose_level(costs, Budget("params", 10), "a")
    with pytest.raises(BudgetError, match="expected level=N"):
        parse_budget("memory=3")


def test_shared_parameters_are_counted_once():
    method, model = build()
    for s in SPECS:
        for lv in method.levels(model, s.name):
            assert selection_parameters(method, model, {s.name: lv.index}) == count_parameters(
                method.export(model, s.name, lv.index)
            )
    both = selection_parameters(method, model, {"a": 2, "b": 2})
    alone = [count_parameters(method.export(model, t, 2)) for t in ("a", "b")]
    # the full trunk is shared: together they need less than apart, more than either
    assert max(alone) < both < sum(alone)
    trunk = count_parameters(model.trunk) - sum(
        p.numel() for n, p in model.trunk.named_parameters() if ".norms." in n
    )
    assert sum(alone) - both == trunk


def test_shared_budget_maximises_summed_accuracy(tmp_path):
    from virtnet.methods.budget import choose_levels

    method, model = build()
    acc = {("a", 1): 80.0, ("a", 2): 90.0, ("b", 1): 70.0, ("b", 2): 95.0}
    shapes = {s.name: (s.in_channels, s.input_size, s.input_size) for s in SPECS}
    full = selection_parameters(method, model, {"a": 2, "b": 2})
    out = choose_levels(method, model, ["a", "b"], Budget("params", full), acc, shapes)
    assert out["levels"] == {"a": 2, "b": 2}
    need_b2 = selection_parameters(method, model, {"a": 1, "b": 2})
    out = choose_levels(method, model, ["a", "b"], Budget("params", need_b2), acc, shapes)
    assert out["levels"] == {"a": 1, "b": 2}  # 80 + 95 beats 90 + 70
    with pytest.raises(BudgetError, match="no combination of levels fits"):
        choose_levels(method, model, ["a", "b"], Budget("params", 100), acc, shapes)


# ---- bad input --------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    method, model = build()
    with pytest.raises(TaskError, match="unknown task 'c'"):
        method.predict(model, torch.zeros(1, 1, 8, 8), "c")
    with pytest.raises(
        DataError, match=r"task 'a': expected input of shape \(B, 1, 8, 8\), got \(1, 1, 9, 9\)"
    ):
        method.predict(model, torch.zeros(1, 1, 9, 9), "a")
    with pytest.raises(BudgetError, match="has levels"):
        method.predict(model, torch.zeros(1, 1, 8, 8), "a", level=3)
    with pytest.raises(ConfigError, match=r"method.orders.a: order \[0, 0\] is not a permutation"):
        build(orders={"a": [0, 0], "b": [1, 0]})
    with pytest.raises(ConfigError, match="method.orders: no order for task 'b'"):
        build(orders={"a": [0, 1]})
    with pytest.raises(ConfigError, match="method.num_units: 9 units do not fit a layer of 8 channels"):
        build(num_units=9)


def test_more_units_than_channels_names_the_key_from_the_cli(tmp_path, capsys):
    import yaml

    from virtnet.cli import main

    cfg = {
        "seed": 0,
        "output_dir": str(tmp_path / "r"),
        "data": {
            "tasks": [{"name": "a", "dataset": "synthetic", "options": {"num_train": 16, "num_test": 8}}]
        },
        "model": {"name": "resnet", "depth": 8, "width": 0.25},
        "method": {"name": "dvn", "num_units": 9},
        "train": {"epochs": 1, "progress": False},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "method.num_units" in err and err.count("\n") == 1


def test_training_after_inference_mode_evaluation():
    """Index tensors first built under torch.inference_mode must not break a later training step."""
    method, model = build()
    model.eval()
    with torch.inference_mode():
        for lv in method.levels(model, "a"):
            model(torch.randn(2, 1, 8, 8), "a", lv.route)
    model.train()
    for lv in method.levels(model, "a"):
        model(torch.randn(2, 1, 8, 8), "a", lv.route).sum().backward()
