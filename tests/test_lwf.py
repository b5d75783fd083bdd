"""LwF: the distillation loss by hand, the teacher's outputs as targets, warm-up, resume, batch norm per
task (statistics recorded per task, the distillation starting at the teacher), options."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_taskset
from torch import nn

from virtnet.api import task_specs
from virtnet.backbones.registry import BackboneConfig
from virtnet.data.loader import eval_batches
from virtnet.errors import ConfigError
from virtnet.methods import make_method
from virtnet.methods.common.distill import as_input_of, distillation_loss
from virtnet.nn import Route, SwitchableBatchNorm
from virtnet.train import TrainConfig, Trainer

BACKBONE = BackboneConfig(name="resnet", depth=8, width=0.5, feature_size=8)


def test_distillation_loss_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    # T = 2: p = softmax([0, 1]), log q = log_softmax([0.5, 0])
    p = [1 / (1 + math.e), math.e / (1 + math.e)]
    lq = [0.5 - math.log(math.exp(0.5) + 1), -math.log(math.exp(0.5) + 1)]
    expected = -(p[0] * lq[0] + p[1] * lq[1])
    assert distillation_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # minimised when the student equals the teacher (cross-entropy >= entropy of p)
    assert distillation_loss(t, t, 2.0) < distillation_loss(s, t, 2.0)


def test_as_input_of_converts_shape():
    from virtnet.backbones.base import TaskSpec

    x = torch.rand(2, 1, 8, 8)
    y = as_input_of(x, TaskSpec("rgb", 3, 12, 5))
    assert y.shape == (2, 3, 12, 12)
    assert torch.equal(as_input_of(x, TaskSpec("same", 1, 8, 5)), x)


def build(**options):
    ts = make_taskset()
    method = make_method("lwf", options)
    torch.manual_seed(0)
    return ts, method, method.build(task_specs(ts), BACKBONE)


def cfg(**kw):
    base = dict(epochs=2, batch_size=16, lr=0.05, progress=False, eval_every=0, checkpoint_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_teacher_outputs_are_the_targets_and_distillation_falls():
    ts, method, model = build()
    phases = method.phases(ts.names)
    assert [p.name for p in phases] == ["task-t0", "task-t1"]
    tr = Trainer(method, model, ts, cfg(epochs=3), 0, None, log=lambda s: None)
    tr._run_phase(phases[0], None)
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        before = model(x, "t0").clone()
    method.on_phase_start(model, phases[1])
    with torch.no_grad():
        assert torch.equal(method._teacher(x, "t0"), before)  # the teacher is the network as it was
    tr.history.clear()
    tr._run_phase(phases[1], None)
    kd = [r["distill/t0"] for r in tr.history if r.get("event") == "train"]
    assert len(kd) >= 2 and kd[-1] < kd[0] * 1.5  # kept near its start while task t1 is learned
    with torch.no_grad():
        assert torch.equal(method._teacher(x, "t0"), before)  # the teacher never moves


@pytest.mark.parametrize("task_bn", ["shared", "stats", "private"])
def test_warmup_trains_only_the_new_head(task_bn):
    ts, method, model = build(warmup_epochs=1, task_bn=task_bn)
    phases = method.phases(ts.names)
    assert [p.name for p in phases] == ["task-t0", "warmup-t1", "task-t1"]
    tr = Trainer(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None)
    tr._run_phase(phases[0], None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tr._run_phase(phases[1], None)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert "heads.t1.weight" in moved
    if task_bn == "shared":  # trunk weights and statistics, stems, old head: all frozen
        assert all(k.startswith("heads.t1.") for k in moved), moved
    else:  # and the new task's own batch-norm statistics, which no other task uses
        own = (".norms.t1.",)  # statistics move; private scale and shift start as t0's, untrained
        st = model.state_dict()
        for k in st:
            if ".norms.t1.weight" in k or ".norms.t1.bias" in k:
                assert torch.equal(st[k], st[k.replace(".t1.", ".t0.")]), k
        assert all(k.startswith("heads.t1.") or any(o in k for o in own) for k in moved), moved
        assert any(".norms.t1.running_mean" in k for k in moved)


def bn_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("old_bn", ["recorded", "batch"])
def test_old_task_keeps_the_statistics_recorded_after_it(old_bn):
    """After learning t1, the network of t0 normalises with exactly the statistics t0 ended with; with
    one set of statistics for every task (the old behaviour) they follow t1's data."""
    for task_bn in ("stats", "private", "shared"):
        ts, method, model = build(task_bn=task_bn, old_bn=old_bn)
        phases = method.phases(ts.names)
        tr = Trainer(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None)
        tr._run_phase(phases[0], None)
        after_t0 = bn_buffers(method.export(model, "t0"))
        weights_t0 = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("trunk.")}
        tr._run_phase(phases[1], None)
        now = bn_buffers(method.export(model, "t0"))
        assert after_t0.keys() == now.keys() and len(now) > 5
        same = all(torch.equal(after_t0[k], now[k]) for k in now)
        assert same == (task_bn != "shared"), task_bn
        # the shared weights did move, and t1's statistics are t1's own
        state = model.state_dict()
        moved = [k for k in weights_t0 if not torch.equal(state[k], weights_t0[k])]
        assert any(k.endswith("conv1.weight") for k in moved)
        if task_bn != "shared":
            t1 = bn_buffers(method.export(model, "t1"))
            assert not all(torch.equal(t1[k], now[k]) for k in now)


def test_distillation_starts_at_the_teacher_with_recorded_statistics():
    """With per-task statistics the old task's forward during training is the teacher's function, so the
    first step's distillation loss is the teacher's own cross-entropy (the KL term is zero); with shared
    statistics the student normalises with batch statistics and starts away from the teacher."""
    losses = {}
    for task_bn in ("stats", "shared"):
        ts, method, model = build(task_bn=task_bn)
        phases = method.phases(ts.names)
        tr = Trainer(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None)
        tr._run_phase(phases[0], None)
        method.on_phase_start(model, phases[1])
        model.train()
        b = next(iter(eval_batches(ts, "t1", split="train", batch_size=16)))
        out = method.training_step(model, {"t1": b}, phases[1])
        with torch.no_grad():
            t = method._teacher(b.x, "t0")
        losses[task_bn] = (out["distill/t0"].item(), distillation_loss(t, t, 2.0).item())
    kd, floor = losses["stats"]
    assert kd == pytest.approx(floor, abs=1e-5)
    kd, floor = losses["shared"]
    assert kd > floor + 1e-4


def test_joint_lr_and_options_are_checked():
    method = make_method("lwf", {"warmup_epochs": 1, "joint_lr": 0.005, "warmup_lr": 0.1})
    phases = method.phases(["a", "b"])
    assert [(p.name, p.info.get("lr")) for p in phases] == [
        ("task-a", None),
        ("warmup-b", 0.1),
        ("task-b", 0.005),
    ]
    assert method.config.task_bn == "stats" and method.config.old_bn == "recorded"
    ts, default, model = build(warmup_epochs=1)
    phases = default.phases(ts.names)
    groups = [default.param_groups(model, p) for p in phases]
    # the first task at train.lr, the warm-up at warmup_lr, a later joint phase at train.lr / 10
    assert [g[0].get("lr_scale", 1.0) for g in groups] == [1.0, 1.0, 0.1]
    assert "lr" not in phases[2].info
    assert method.param_groups(model, method.phases(ts.names)[2])[0].get("lr_scale", 1.0) == 1.0
    for bad in ({"task_bn": "per_task"}, {"old_bn": "frozen"}, {"joint_lr": 0.0}, {"joint_lr": -1}):
        with pytest.raises(ConfigError, match="method"):
            make_method("lwf", bad)


@pytest.mark.parametrize("dims", [1, 2])
def test_switchable_batch_norm_with_shared_affine(dims):
    """Shared scale and shift, statistics per key: the forward is torch's batch norm with the key's
    statistics, only that key's statistics move in training, and plain() is the same function."""
    torch.manual_seed(0)
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    sw = SwitchableBatchNorm({"a": 4, "b": 4}, dims, shared_affine=True)
    with torch.no_grad():
        sw.weight.copy_(bn.weight)
        sw.bias.copy_(bn.bias)
    assert sorted(n for n, _ in sw.named_parameters()) == ["bias", "weight"]
    x = torch.randn(8, 4, 3, 3) if dims == 2 else torch.randn(8, 4)
    ra = Route("t", key="a")
    sw.train()
    bn.train()
    assert torch.allclose(sw(x, ra), bn(x), atol=1e-6)
    assert torch.allclose(sw.norm("a").running_mean, bn.running_mean)
    assert torch.equal(sw.norm("b").running_mean, torch.zeros(4))  # b untouched
    sw.eval()
    bn.eval()
    assert torch.allclose(sw(x, ra), bn(x), atol=1e-6)
    assert torch.allclose(sw.plain(ra)(x), sw(x, ra), atol=1e-6)
    assert set(sw.usage(ra)) == {"weight", "bias"} and sw.delegates(ra) == []
    with pytest.raises(ValueError, match="one channel count"):
        SwitchableBatchNorm({"a": 4, "b": 5}, dims, shared_affine=True)


def test_resume_mid_phase_rebuilds_the_same_teacher(tmp_path):
    ts, method, model = build()
    c = cfg(epochs=2, checkpoint_every_steps=2)
    Trainer(method, model, ts, c, 0, tmp_path / "ref", {}, log=lambda s: None).fit()

    class Stop(Exception):
        pass

    ts2, m2, model2 = build()
    orig = m2.training_step
    calls = {"n": 0}

    def dying(mdl, batches, phase):
        if phase.index == 1 and calls["n"] == 4:
            raise Stop
        calls["n"] += phase.index == 1
        return orig(mdl, batches, phase)

    m2.training_step = dying  # type: ignore[method-assign]
    with pytest.raises(Stop):
        Trainer(m2, model2, ts2, c, 0, tmp_path / "cut", {}, log=lambda s: None).fit()
    ts3, m3, model3 = build()
    Trainer(m3, model3, ts3, c, 0, tmp_path / "cut", {}, log=lambda s: None).fit(resume=True)
    for (k, a), b in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoints_from_before_per_task_batch_norm_still_load():
    """A model saved before ``task_bn`` existed has no ``task_keyed`` in its structure: it is rebuilt with
    one set of statistics, so its weights load; a new one is rebuilt keyed by task."""
    ts, method, model = build()
    assert model.structure() == {"task_keyed": True} and model.route("t0").key == "t0"
    old = make_method("lwf", {})
    rebuilt = old.create(task_specs(ts), BACKBONE, structure={})
    assert old.config.task_bn == "shared" and not rebuilt.task_keyed and rebuilt.route("t0") is None
    assert not any(".norms." in k for k in rebuilt.state_dict())
    new = make_method("lwf", {}).create(task_specs(ts), BACKBONE, structure=model.structure())
    new.load_state_dict(model.state_dict())  # the same keys
