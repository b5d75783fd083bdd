"""LwF: the distillation loss by hand, the teacher's outputs as targets, warm-up, resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_taskset

from virtnet.api import task_specs
from virtnet.backbones.registry import BackboneConfig
from virtnet.methods import make_method
from virtnet.methods.common.distill import as_input_of, distillation_loss
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


def test_warmup_trains_only_the_new_head():
    ts, method, model = build(warmup_epochs=1)
    phases = method.phases(ts.names)
    assert [p.name for p in phases] == ["task-t0", "warmup-t1", "task-t1"]
    tr = Trainer(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None)
    tr._run_phase(phases[0], None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tr._run_phase(phases[1], None)
    for k, v in model.state_dict().items():
        if k.startswith("heads.t1."):
            assert not torch.equal(v, state[k]), k
        else:
            assert torch.equal(v, state[k]), k  # trunk weights and statistics, stems, old head


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
