"""The shared training loop: determinism, resume equality, and the baselines' freezing promises."""

from __future__ import annotations

import pytest
import torch
from conftest import make_taskset

from virtnet.api import task_specs
from virtnet.backbones.registry import BackboneConfig
from virtnet.data.core import AugmentSpec
from virtnet.methods import Phase, make_method
from virtnet.methods.joint import Joint
from virtnet.train import TrainConfig, Trainer, evaluate, lr_factor

BACKBONE = BackboneConfig(name="resnet", depth=8, width=0.5, feature_size=8)


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=0.05, progress=False, eval_every=0, checkpoint_every=1)
    base.update(kw)
    return TrainConfig(**base)


def augmented_taskset():
    ts = make_taskset()
    for t in ts:
        t.augment = AugmentSpec(crop_padding=1, hflip=True)
    return ts


def build(name: str, ts, seed: int = 0, **options):
    method = make_method(name, options)
    torch.manual_seed(seed)
    return method, method.build(task_specs(ts), BACKBONE)


def fit(name, ts, train_cfg, seed=0, out=None, resume=False, method=None, model=None):
    if method is None:
        method, model = build(name, ts, seed)
    tr = Trainer(method, model, ts, train_cfg, seed, out, {"test": True}, log=lambda s: None)
    tr.fit(resume=resume)
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_same_seed_same_weights_and_other_seed_differs():
    ts = augmented_taskset()
    a = fit("joint", ts, cfg())
    b = fit("joint", ts, cfg())
    assert_same_state(a, b)
    c = fit("joint", ts, cfg(), seed=1)
    assert not torch.equal(next(iter(a.parameters())), next(iter(c.parameters())))


class Interrupt(Exception):
    pass


class ScriptedJoint(Joint):
    """Joint training that dies before its ``stop_at``-th step, or whose loss is NaN after ``nan_after``
    steps."""

    name = "joint"  # not registered: used directly

    def __init__(self, stop_at: int | None = None, nan_after: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.stop_at, self.nan_after = stop_at, nan_after

    def training_step(self, model, batches, phase):
        if self.calls == self.stop_at:
            raise Interrupt
        self.calls += 1
        out = super().training_step(model, batches, phase)
        if self.nan_after is not None and self.calls > self.nan_after:
            out["loss"] = out["loss"] * float("nan")
        return out


@pytest.mark.parametrize("every_steps, stop_at", [(2, 5), (0, 4)])
def test_resume_ends_with_the_same_weights(tmp_path, every_steps, stop_at):
    ts = augmented_taskset()  # 48 images / 16 = 3 steps per epoch
    train_cfg = cfg(epochs=3, checkpoint_every_steps=every_steps)
    ref = fit("joint", ts, train_cfg, out=tmp_path / "ref")

    method = ScriptedJoint(stop_at=stop_at)
    torch.manual_seed(0)
    model = method.build(task_specs(ts), BACKBONE)
    with pytest.raises(Interrupt):
        Trainer(method, model, ts, train_cfg, 0, tmp_path / "cut", {}, log=lambda s: None).fit()
    _, fresh = build("joint", ts, seed=123)  # other initial weights: everything must come from the checkpoint
    resumed = fit(
        "joint", ts, train_cfg, out=tmp_path / "cut", resume=True, method=make_method("joint"), model=fresh
    )
    assert_same_state(ref, resumed)


def test_resume_at_a_phase_boundary_of_a_sequential_method(tmp_path):
    ts = make_taskset()
    train_cfg = cfg(epochs=1)
    ref = fit("finetune", ts, train_cfg, out=tmp_path / "ref")

    method, model = build("finetune", ts)
    original = method.training_step

    def dying(model_, batches, phase):
        if phase.index == 1:
            raise Interrupt
        return original(model_, batches, phase)

    method.training_step = dying  # type: ignore[method-assign]
    with pytest.raises(Interrupt):
        Trainer(method, model, ts, train_cfg, 0, tmp_path / "cut", {}, log=lambda s: None).fit()
    m2, fresh = build("finetune", ts, seed=7)
    resumed = fit("finetune", ts, train_cfg, out=tmp_path / "cut", resume=True, method=m2, model=fresh)
    assert_same_state(ref, resumed)


def test_feature_extraction_leaves_the_trunk_and_its_statistics_untouched():
    ts = make_taskset()
    method, model = build("feature_extraction", ts)
    phases = method.phases(ts.names)
    tr = Trainer(
        method, model, ts, cfg(epochs=1, weight_decay=0.1, momentum=0.9), 0, None, log=lambda s: None
    )
    # run the first phase, snapshot, then the second
    tr._run_phase(phases[0], None)
    trunk_before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    stem_before = {k: v.clone() for k, v in model.stem("t0").state_dict().items()}
    head0_before = {k: v.clone() for k, v in model.heads["t0"].state_dict().items()}
    head1_before = {k: v.clone() for k, v in model.heads["t1"].state_dict().items()}
    tr._run_phase(phases[1], None)
    for k, v in model.trunk.state_dict().items():
        assert torch.equal(v, trunk_before[k]), k  # weights AND running statistics
    for k, v in model.stem("t0").state_dict().items():
        assert torch.equal(v, stem_before[k]), k  # shared stem (equal input shapes) frozen too
    for k, v in model.heads["t0"].state_dict().items():
        assert torch.equal(v, head0_before[k]), k
    assert not torch.equal(model.heads["t1"].weight, head1_before["weight"])


def test_finetune_moves_the_trunk_but_not_old_heads():
    ts = make_taskset()
    method, model = build("finetune", ts)
    phases = method.phases(ts.names)
    assert [p.tasks for p in phases] == [["t0"], ["t1"]]
    tr = Trainer(method, model, ts, cfg(epochs=1, weight_decay=0.1), 0, None, log=lambda s: None)
    tr._run_phase(phases[0], None)
    head0 = model.heads["t0"].weight.clone()
    trunk = next(model.trunk.parameters()).clone()
    tr._run_phase(phases[1], None)
    assert torch.equal(model.heads["t0"].weight, head0)
    assert not torch.equal(next(model.trunk.parameters()), trunk)


@pytest.mark.parametrize("name", ["joint", "individual"])
def test_joint_methods_learn_the_patterns(name):
    ts = make_taskset()
    method, model = build(name, ts)
    Trainer(method, model, ts, cfg(epochs=6, lr=0.05), 0, None, log=lambda s: None).fit()
    rows = evaluate(method, model, ts)
    assert [r["task"] for r in rows] == ["t0", "t1"]
    for r in rows:
        assert r["total"] == 24
        assert r["accuracy"] > 60.0, r  # 3 classes: chance is 33 %


def test_individual_networks_share_nothing():
    ts = make_taskset()
    method, model = build("individual", ts, width=0.5)
    p0 = {id(p) for p in model.task_network("t0").parameters()}
    p1 = {id(p) for p in model.task_network("t1").parameters()}
    assert not p0 & p1
    assert method.shared_prefixes() == ()


def test_schedules_by_hand():
    c = TrainConfig(schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(c, s, 100, 10) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    c = TrainConfig(schedule="cosine")
    assert lr_factor(c, 0, 100, 10) == pytest.approx(1.0)
    assert lr_factor(c, 50, 100, 10) == pytest.approx(0.5)
    c = TrainConfig(schedule="constant", warmup_epochs=1, epochs=2)
    assert [lr_factor(c, s, 20, 10) for s in (0, 4, 9, 10)] == pytest.approx([0.1, 0.5, 1.0, 1.0])


def test_unknown_phase_task_fails_clearly():
    ts = make_taskset()
    method, model = build("joint", ts)
    from virtnet.errors import TaskError

    with pytest.raises(TaskError, match="unknown task 'nope'"):
        Trainer(method, model, ts, cfg(), 0, None, log=lambda s: None)._run_phase(Phase("x", ["nope"]), None)


def test_input_of_the_wrong_shape_for_its_task_is_refused():
    from virtnet.errors import DataError

    ts = make_taskset(shapes=((1, 8), (3, 12)))
    method, model = build("joint", ts)
    model.eval()
    assert method.predict(model, torch.zeros(2, 3, 12, 12), "t1").shape == (2, 3)
    with pytest.raises(
        DataError, match=r"task 't0': expected input of shape \(B, 1, 8, 8\), got \(2, 3, 8, 8\)"
    ):
        method.predict(model, torch.zeros(2, 3, 8, 8), "t0")
    with pytest.raises(DataError, match="task 't1'"):
        method.predict(model, torch.zeros(2, 3, 8, 8), "t1")


def test_a_nonfinite_loss_stops_training_with_a_clear_error(tmp_path):
    import json

    from virtnet.errors import TrainingError

    ts = make_taskset()
    method = ScriptedJoint(nan_after=1)
    torch.manual_seed(0)
    model = method.build(task_specs(ts), BACKBONE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = Trainer(method, model, ts, cfg(), 0, tmp_path, {"test": True}, log=lambda s: None)
    with pytest.raises(TrainingError, match=r"phase joint, epoch 1, step 2: the loss is nan"):
        tr.fit()
    # stopped before the NaN reached the weights: one finite step was taken, the second was not
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"event": "nonfinite", "phase": "joint", "epoch": 0, "step": 2, "stopped": True}


def test_a_nonfinite_loss_can_be_recorded_and_training_goes_on(tmp_path):
    import json

    ts = make_taskset()
    method = ScriptedJoint(nan_after=1)
    torch.manual_seed(0)
    model = method.build(task_specs(ts), BACKBONE)
    logged: list[str] = []
    Trainer(method, model, ts, cfg(nonfinite_loss="warn"), 0, tmp_path, {}, log=logged.append).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["event"] == "nonfinite"] == [
        {"event": "nonfinite", "phase": "joint", "epoch": 0, "step": 2}  # the first of the phase only
    ]
    assert sum("warning" in line for line in logged) == 1
    assert method.calls == 2 * tr_steps(ts)  # every step of both epochs ran


def tr_steps(ts) -> int:
    from virtnet.data.loader import MultiTaskLoader

    return MultiTaskLoader(ts, 16, 0, sampling="all", augment=True).steps_per_epoch()
