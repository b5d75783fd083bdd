"""The step module, the runtime, sharding and the loop's hooks (rebuilt optimizers, several optimizers,
phases decided as training goes, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import make_taskset
from torch import nn

from virtnet.api import task_specs
from virtnet.backbones.registry import BackboneConfig
from virtnet.data.core import AugmentSpec
from virtnet.data.loader import MultiTaskLoader
from virtnet.errors import ConfigError
from virtnet.methods import Phase, make_method, method_names
from virtnet.methods.base import OptimizerSpec
from virtnet.methods.joint import Joint
from virtnet.train import TrainConfig, Trainer, load_checkpoint
from virtnet.train.runtime import Runtime
from virtnet.train.step import (
    StepModule,
    build_optimizers,
    carry_state,
    find_unused,
    phase_from_dict,
    phase_to_dict,
)

BACKBONE = BackboneConfig(name="resnet", depth=8, width=0.5, feature_size=8)


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=0.05, progress=False, eval_every=0, checkpoint_every=1)
    base.update(kw)
    return TrainConfig(**base)


def build(method, ts, seed=0):
    torch.manual_seed(seed)
    return method.build(task_specs(ts), BACKBONE)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class Interrupt(Exception):
    pass


# ---- step module ----------
def test_the_step_module_returns_the_methods_losses_and_holds_the_model():
    ts = make_taskset()
    method = make_method("joint")
    model = build(method, ts)
    step = StepModule(model, method)
    assert {n for n, _ in step.named_parameters()} == {f"model.{n}" for n, _ in model.named_parameters()}
    batches = next(MultiTaskLoader(ts, 8, 0).iterate(0))
    a, b = (
        step(batches, Phase("joint", ts.names)),
        method.training_step(model, batches, Phase("joint", ts.names)),
    )
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- sharding ----------
@pytest.mark.parametrize("sampling", ["all", "round_robin"])
def test_shards_concatenate_to_the_global_batch(sampling):
    ts = make_taskset(n_train=44)  # 44 = 2 x 16 + 12: a short last batch of 12 images
    for t in ts:
        t.augment = AugmentSpec(crop_padding=1, hflip=True)
    full = list(MultiTaskLoader(ts, 16, 3, sampling=sampling).iterate(5))
    shards = [
        list(MultiTaskLoader(ts, 16, 3, sampling=sampling, rank=r, world_size=2).iterate(5)) for r in (0, 1)
    ]
    assert len(full) == len(shards[0]) == len(shards[1])
    for g, s0, s1 in zip(full, *shards, strict=True):
        assert g.keys() == s0.keys() == s1.keys()
        for t in g:
            assert len(s0[t]) == len(s1[t]) == len(g[t]) // 2
            assert torch.equal(torch.cat([s0[t].x, s1[t].x]), g[t].x)  # augmentation included
            assert torch.equal(torch.cat([s0[t].y, s1[t].y]), g[t].y)


def test_a_short_batch_is_padded_to_a_multiple_of_the_world_size_with_the_first_images_of_the_pass():
    ts = make_taskset(n_train=35)  # batches of 16, 16, 3
    full = list(MultiTaskLoader(ts, 16, 0, augment=False, tasks=["t0"]).iterate(0))
    shards = [
        list(MultiTaskLoader(ts, 16, 0, augment=False, tasks=["t0"], rank=r, world_size=4).iterate(0))
        for r in range(4)
    ]
    last = [s[-1]["t0"] for s in shards]
    assert [len(b) for b in last] == [1, 1, 1, 1]  # 3 images padded to 4
    x = torch.cat([b.x for b in last])
    assert torch.equal(x[:3], full[-1]["t0"].x)
    assert torch.equal(x[3], full[0]["t0"].x[0])  # the pass's first image


def test_a_world_size_that_does_not_divide_the_batch_is_one_line_error():
    ts = make_taskset()
    with pytest.raises(
        ConfigError, match=r"^train.batch_size: 16 .* among 3 processes; use a multiple of 3$"
    ):
        MultiTaskLoader(ts, 16, 0, rank=0, world_size=3)
    method = make_method("joint")
    with pytest.raises(ConfigError, match=r"^train.batch_size: 16 .*does not divide among 3 processes"):
        Trainer(method, build(method, ts), ts, cfg(), runtime=Runtime(world_size=3))


def test_a_method_that_cannot_train_data_parallel_is_refused_by_name():
    class Serial(Joint):
        name = "serial-toy"
        data_parallel = False

    ts = make_taskset()
    method = Serial()
    with pytest.raises(ConfigError, match=r"method 'serial-toy': its training cannot run data-parallel"):
        Trainer(method, build(method, ts), ts, cfg(), runtime=Runtime(world_size=2))


def test_cuda_is_refused_clearly_when_not_available():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=r"train.device: 'cuda' was asked for but this torch sees no CUDA"):
        Runtime.from_env("cuda")


def test_one_process_runtime_from_the_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = Runtime.from_env()
    assert (rt.rank, rt.world_size, rt.is_main, rt.distributed) == (0, 1, True, False)
    assert rt.mean({"loss": 2.0}) == {"loss": 2.0}


# ---- freezing and find_unused_parameters ----------
def test_parameters_no_optimizer_holds_are_frozen_for_the_phase_only():
    ts = make_taskset()
    method = make_method("finetune")
    model = build(method, ts)
    phases = method.phases(ts.names)
    seen = {}

    def spy(model_, batches, phase):
        seen[phase.index] = model_.heads["t0"].weight.requires_grad
        return type(method).training_step(method, model_, batches, phase)

    method.training_step = spy  # type: ignore[method-assign]
    tr = Trainer(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None)
    tr._run_phase(phases[1], None)  # learning t1: t0's head is in no optimizer
    assert seen == {1: False}
    assert all(p.requires_grad for p in model.parameters())  # restored after the phase


def test_the_find_unused_rule():
    joint = make_method("joint")
    two, one = Phase("joint", ["t0", "t1"]), Phase("task-t0", ["t0"])
    assert not find_unused(joint, two, "all")
    assert find_unused(joint, two, "round_robin") and find_unused(joint, two, "proportional")
    assert not find_unused(joint, one, "round_robin")  # one task: the same parameters every step


def test_phases_of_every_method_survive_the_checkpoint_json():
    for name in method_names():
        for ph in make_method(name).phases(["t0", "t1"]):
            back = phase_from_dict(json.loads(json.dumps(phase_to_dict(ph))))
            assert back == ph, name


# ---- (a) rebuilding the optimizer after the parameter set changed ----------
class Growing(Joint):
    """Joint training that adds a parameter ``grown`` (a copy of t0's head weight) after its second step."""

    name = "growing-toy"

    def training_step(self, model, batches, phase):
        out = super().training_step(model, batches, phase)
        if hasattr(model, "grown"):
            out["loss"] = out["loss"] + 1e-3 * (model.grown**2).sum()
        return out

    def on_step_end(self, model, phase, ctx):
        if ctx.global_step == 2:
            model.grown = nn.Parameter(model.heads["t0"].weight.detach().clone())
            ctx.rebuild_optimizer(state_from={"grown": "heads.t0.weight"})


def test_a_rebuilt_optimizer_keeps_the_state_of_kept_parameters_and_copies_the_named_origin():
    ts = make_taskset()
    method = Growing()
    model = build(method, ts)
    snapshots = {}

    class Spy(Trainer):
        def _rebuild(self, phase, state_from):
            old = self._opts["main"].opt
            snapshots["before"] = {
                n: old.state[p]["momentum_buffer"].clone()
                for n, p in model.named_parameters()
                if p in old.state
            }
            super()._rebuild(phase, state_from)
            new = self._opts["main"].opt
            snapshots["after"] = {
                n: new.state[p]["momentum_buffer"].clone()
                for n, p in model.named_parameters()
                if p in new.state
            }
            snapshots["params"] = {id(p) for p in self._opts["main"].params}

    Spy(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None).fit()
    before, after = snapshots["before"], snapshots["after"]
    assert "grown" not in before and set(after) == set(before) | {"grown"}
    for n in before:
        assert torch.equal(after[n], before[n]), n
    assert torch.equal(after["grown"], before["heads.t0.weight"])
    assert id(model.grown) in snapshots["params"]


def test_carry_state_by_name_starts_unnamed_new_parameters_fresh():
    lin = nn.Linear(2, 2)
    phase = Phase("p", ["t"])

    class M:
        def __init__(self, model):
            self.model = model

        def optimizers(self, model, phase):
            return [OptimizerSpec("main", [{"params": list(model.parameters())}])]

    old = build_optimizers(M(lin), lin, phase, cfg())
    lin(torch.ones(1, 2)).sum().backward()
    old["main"].opt.step()
    names = {id(p): n for n, p in lin.named_parameters()}
    lin.extra = nn.Parameter(torch.zeros(3))
    new = build_optimizers(M(lin), lin, phase, cfg())
    carry_state(old, new, lin, {}, names)
    st = new["main"].opt.state
    assert torch.equal(
        st[lin.weight]["momentum_buffer"], old["main"].opt.state[lin.weight]["momentum_buffer"]
    )
    assert lin.extra not in st


# ---- (b) several optimizers ----------
class TwoOptimizers(Joint):
    """SGD over the trunk and stems, Adam (its own lr, constant) over the heads; dies at ``stop_at``."""

    name = "two-optimizers-toy"

    def __init__(self, stop_at=None):
        super().__init__()
        self.stop_at, self.calls = stop_at, 0

    def optimizers(self, model, phase):
        heads = {id(p) for p in model.heads.parameters()}
        rest = [p for p in model.parameters() if id(p) not in heads]
        return [
            OptimizerSpec("sgd", [{"params": rest}]),
            OptimizerSpec(
                "adam",
                [{"params": list(model.heads.parameters())}],
                kind="adam",
                lr=0.01,
                schedule="constant",
            ),
        ]

    def training_step(self, model, batches, phase):
        if self.calls == self.stop_at:
            raise Interrupt
        self.calls += 1
        return super().training_step(model, batches, phase)


def test_two_optimizers_are_each_stepped_checkpointed_by_name_and_resumed_exactly(tmp_path):
    ts = make_taskset()
    c = cfg(epochs=2, checkpoint_every_steps=2)
    ref_m = TwoOptimizers()
    ref = build(ref_m, ts)
    tr = Trainer(ref_m, ref, ts, c, 0, tmp_path / "ref", {}, log=lambda s: None)
    tr.fit()
    assert isinstance(tr._opts["adam"].opt, torch.optim.Adam) and isinstance(
        tr._opts["sgd"].opt, torch.optim.SGD
    )
    assert tr._opts["adam"].opt.param_groups[0]["lr"] == 0.01  # its own lr, constant schedule

    cut = TwoOptimizers(stop_at=4)
    with pytest.raises(Interrupt):
        Trainer(cut, build(cut, ts), ts, c, 0, tmp_path / "cut", {}, log=lambda s: None).fit()
    ck = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last")
    assert {g["optimizer"] for g in ck.meta["optimizer"]["param_groups"]} == {"sgd", "adam"}
    assert any(k.startswith("optim/adam/") and k.endswith("/exp_avg") for k in ck.optim_tensors)
    assert any(k.startswith("optim/sgd/") and k.endswith("/momentum_buffer") for k in ck.optim_tensors)
    m2 = TwoOptimizers()
    resumed = build(m2, ts, seed=5)
    Trainer(m2, resumed, ts, c, 0, tmp_path / "cut", {}, log=lambda s: None).fit(resume=True)
    assert_same_state(ref, resumed)


# ---- (c) phases decided as training goes ----------
class Deciding(Joint):
    """A joint phase, then a phase on the task whose last logged loss was the highest; dies at ``stop_at``."""

    name = "deciding-toy"

    def __init__(self, stop_at=None):
        super().__init__()
        self.stop_at, self.calls, self.asked = stop_at, 0, 0

    def next_phase(self, tasks, done, history):
        self.asked += 1
        if not done:
            return Phase("warm", list(tasks))
        if len(done) == 1:
            last = [r for r in history if r["phase"] == "warm"][-1]["train"]
            worst = max(tasks, key=lambda t: last[f"loss/{t}"])
            return Phase(f"focus-{worst}", [worst], info={"worst": worst, "from_loss": last[f"loss/{worst}"]})
        return None

    def training_step(self, model, batches, phase):
        if self.calls == self.stop_at:
            raise Interrupt
        self.calls += 1
        return super().training_step(model, batches, phase)


@pytest.mark.parametrize("stop_at", [2, 8])  # in the first phase (before the decision), in the second
def test_phases_decided_from_metrics_are_replayed_on_resume(tmp_path, stop_at):
    ts = make_taskset()
    c = cfg(epochs=2, checkpoint_every_steps=1, log_every=1)
    ref_m = Deciding()
    ref = build(ref_m, ts)
    summary = Trainer(ref_m, ref, ts, c, 0, tmp_path / "ref", {}, log=lambda s: None).fit()
    assert [p["name"] for p in summary["phases"]][0] == "warm" and len(summary["phases"]) == 2
    assert ref_m.asked == 3

    cut = Deciding(stop_at=stop_at)
    with pytest.raises(Interrupt):
        Trainer(cut, build(cut, ts), ts, c, 0, tmp_path / "cut", {}, log=lambda s: None).fit()
    meta = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last").meta
    assert len(meta["phases"]) == (1 if stop_at == 2 else 2)
    m2 = Deciding()
    resumed = build(m2, ts, seed=9)
    s2 = Trainer(m2, resumed, ts, c, 0, tmp_path / "cut", {}, log=lambda s: None).fit(resume=True)
    assert s2["phases"] == summary["phases"]
    assert m2.asked == (2 if stop_at == 2 else 1)  # decided phases are not decided again
    assert_same_state(ref, resumed)


# ---- SIGTERM ----------
class Terminated(Exception):
    pass


def test_sigterm_writes_a_last_checkpoint_and_resume_ends_with_the_same_weights(tmp_path):
    ts = make_taskset()
    c = cfg(epochs=2)
    ref_m = make_method("joint")
    ref = build(ref_m, ts)
    Trainer(ref_m, ref, ts, c, 0, tmp_path / "ref", {}, log=lambda s: None).fit()

    class Killed(Joint):
        calls = 0

        def training_step(self, model, batches, phase):
            Killed.calls += 1
            if Killed.calls == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step, handled after it
            return super().training_step(model, batches, phase)

    def outer(signum, frame):
        raise Terminated

    prev = signal.signal(signal.SIGTERM, outer)
    try:
        method = Killed()
        tr = Trainer(method, build(method, ts), ts, c, 0, tmp_path / "cut", {}, log=lambda s: None)
        with pytest.raises(Terminated):
            tr.fit()
        assert signal.getsignal(signal.SIGTERM) is outer  # restored
    finally:
        signal.signal(signal.SIGTERM, prev)
    meta = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last").meta
    assert meta["state"]["epoch"] == 1 and meta["state"]["step"] == 1  # after the 4th step (3 per epoch)
    m2 = make_method("joint")
    resumed = build(m2, ts, seed=3)
    Trainer(m2, resumed, ts, c, 0, tmp_path / "cut", {}, log=lambda s: None).fit(resume=True)
    assert_same_state(ref, resumed)
