"""PackNet through virtnet's one training loop: every backbone, a user's module, resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import make_taskset
from torch import nn

from virtnet import api
from virtnet.api import task_specs
from virtnet.backbones.registry import BackboneConfig, backbone_names
from virtnet.cli import main
from virtnet.config import RunConfig, validate
from virtnet.errors import CheckpointError, ConfigError, TrainingError
from virtnet.methods import make_method
from virtnet.methods.packnet import PackNet, PackNetConfig, PackNetModel
from virtnet.train import TrainConfig, Trainer, load_checkpoint, load_model_state


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL: dict[str, dict[str, Any]] = {
    "resnet": {"depth": 8},
    "wrn": {"depth": 10, "widen_factor": 1},
    "vgg": {"hidden": [8]},
    "simpleconvnet": {},
    "resnet26": {},
}


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=0.05, progress=False, eval_every=0, checkpoint_every=1)
    base.update(kw)
    return TrainConfig(**base)


def batch_of(spec) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(5, spec.in_channels, spec.input_size, spec.input_size, generator=g)


def record(method: PackNet, specs) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """After every phase, the eval outputs of every task added so far on a fixed batch."""
    seen: dict[str, list[tuple[str, torch.Tensor]]] = {}
    end = method.on_phase_end

    def on_end(model, phase):
        end(model, phase)
        was = model.training
        model.eval()
        with torch.no_grad():
            for s in specs:
                if s.name in model.added:
                    seen.setdefault(s.name, []).append((phase.name, model(batch_of(s), s.name)))
        model.train(was)

    method.on_phase_end = on_end  # type: ignore[method-assign]
    return seen


def assert_frozen_after_own_phases(seen, method, tasks):
    """Once a task's last phase is over, its outputs never change again (torch.equal)."""
    phases = method.phases(tasks)
    for task in tasks:
        last = max(p.index for p in phases if p.tasks == [task])
        rows = [(n, o) for n, o in seen[task] if [p.index for p in phases if p.name == n][0] >= last]
        assert len(rows) == 1 + sum(1 for p in phases if p.index > last)
        for name, out in rows[1:]:
            assert torch.equal(out, rows[0][1]), f"{task} changed in phase {name}"


@pytest.mark.parametrize("name", backbone_names())
def test_every_backbone_earlier_tasks_bit_identical_and_export_equal(name):
    ts = make_taskset(shapes=((1, 8), (1, 8), (3, 12)), n_train=32)
    specs = task_specs(ts)
    backbone = validate(
        BackboneConfig, {"name": name, "width": 0.25, "feature_size": 8, **SMALL.get(name, {})}
    )
    method = make_method("packnet", {"prune_ratios": [0.5, 0.75], "retrain_epochs": 1, "retrain_lr": 0.01})
    torch.manual_seed(0)
    model = method.build(specs, backbone)
    seen = record(method, specs)
    Trainer(method, model, ts, cfg(max_steps_per_epoch=2), 0, None, {}, log=lambda s: None).fit()
    assert_frozen_after_own_phases(seen, method, ts.names)
    counts = model.ownership.counts()
    assert counts[0] == 0 and all(counts[t] > 0 for t in (1, 2, 3))
    model.eval()
    for s in specs:
        x = batch_of(s)
        with torch.no_grad():
            assert torch.allclose(method.export(model, s.name)(x), model(x, s.name), atol=1e-6, rtol=0)


def user_body() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
    )


@pytest.mark.parametrize("task_specific", [False, True])
def test_user_module_through_the_training_loop(task_specific):
    ts = make_taskset(shapes=((1, 8), (1, 8), (1, 8)), n_train=32)
    specs = task_specs(ts)
    torch.manual_seed(0)
    model = PackNet.wrap(
        user_body(),
        {s.name: s.num_outputs for s in specs},
        feature_dim=16,
        task_specific_bn=task_specific,
        task_specific_bias=task_specific,
    )
    method = PackNet(PackNetConfig(prune_ratios=[0.5, 0.5], retrain_epochs=1, retrain_lr=0.01))
    seen = record(method, specs)
    train_cfg = cfg(epochs=2, momentum=0.9, weight_decay=0.01)
    Trainer(method, model, ts, train_cfg, 0, None, {}, log=lambda s: None).fit()
    assert_frozen_after_own_phases(seen, method, ts.names)
    assert model.added == ts.names
    x = batch_of(specs[0])
    model.eval()
    for s in specs:
        with torch.no_grad():
            assert torch.equal(method.export(model, s.name)(x), model(x, s.name))


def test_phases_map_train_prune_and_retrain():
    method = make_method("packnet", {"prune_ratios": [0.5, 0.75], "retrain_epochs": 2, "retrain_lr": 1e-4})
    phases = method.phases(["a", "b", "c"])
    assert [p.name for p in phases] == ["task-a", "task-a-retrain", "task-b", "task-b-retrain", "task-c"]
    assert [p.index for p in phases] == [0, 1, 2, 3, 4]
    assert [p.info["packnet"]["prune_after"] for p in phases] == [[0.5], [], [0.75], [], []]
    assert phases[1].info["epochs"] == 2 and phases[1].info["lr"] == 1e-4 and "epochs" not in phases[0].info
    inc = make_method("packnet", {"prune_ratios": [0.5], "prune_steps": 2, "retrain_epochs": 1})
    names = [p.name for p in inc.phases(["a", "b"])]
    assert names == ["task-a", "task-a-retrain1", "task-a-retrain2", "task-b"]
    no_retrain = make_method("packnet", {"prune_ratios": [0.5], "retrain_epochs": 0}).phases(["a", "b"])
    assert [p.name for p in no_retrain] == ["task-a", "task-b"]
    assert no_retrain[0].info["packnet"]["prune_after"] == [0.5]
    with pytest.raises(ConfigError, match="1 ratios for 3 tasks"):
        make_method("packnet", {"prune_ratios": [0.5]}).build(
            task_specs(make_taskset(shapes=((1, 8),) * 3)), BackboneConfig(name="resnet", depth=8)
        )


def test_retraining_runs_at_a_small_constant_rate():
    ts = make_taskset(n_train=32)
    options = {"prune_ratios": [0.5], "retrain_epochs": 2, "retrain_lr": 0.003}
    method = make_method("packnet", options)
    torch.manual_seed(0)
    model = method.build(task_specs(ts), BACKBONE)
    trainer = Trainer(method, model, ts, cfg(epochs=2, log_every=1), 0, None, {}, log=lambda s: None)
    trainer.fit()
    lrs: dict[str, list[float]] = {}
    for r in trainer.history:
        if r["event"] == "train":
            lrs.setdefault(r["phase"], []).append(r["lr"])
    assert lrs["task-t0-retrain"] == [0.003] * 4  # 2 epochs x 2 steps, constant
    assert len(lrs["task-t0"]) == 4 and lrs["task-t0"][0] > lrs["task-t0"][-1]  # the run's cosine


def test_no_free_weights_in_training_is_a_clear_error():
    ts = make_taskset(n_train=16)
    method = make_method("packnet", {"prune_ratios": [0.0]})
    torch.manual_seed(0)
    model = method.build(task_specs(ts), BackboneConfig(name="resnet", depth=8, width=0.25, feature_size=8))
    with pytest.raises(ConfigError, match="no free weights remain for task 't1'"):
        Trainer(method, model, ts, cfg(max_steps_per_epoch=1), 0, None, {}, log=lambda s: None).fit()


class Interrupt(Exception):
    pass


BACKBONE = BackboneConfig(name="resnet", depth=8, width=0.25, feature_size=8)
OPTIONS = {"prune_ratios": [0.5], "retrain_epochs": 2, "retrain_lr": 0.01}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("stop_at", [4, 7])  # in task-t0-retrain, in task-t1 (steps: 3 + 6 + 3)
def test_resume_ends_with_the_same_weights(tmp_path, stop_at):
    ts = make_taskset()  # 48 images / 16 = 3 steps per epoch
    specs = task_specs(ts)
    train_cfg = cfg(epochs=1, checkpoint_every_steps=1)

    def run(out, method, model, resume=False):
        Trainer(method, model, ts, train_cfg, 0, out, {}, log=lambda s: None).fit(resume=resume)
        return model

    method = make_method("packnet", OPTIONS)
    torch.manual_seed(0)
    ref = run(tmp_path / "ref", method, method.build(specs, BACKBONE))

    dying = make_method("packnet", OPTIONS)
    calls = {"n": 0}
    step = dying.training_step

    def training_step(model, batches, phase):
        if calls["n"] == stop_at:
            raise Interrupt
        calls["n"] += 1
        return step(model, batches, phase)

    dying.training_step = training_step  # type: ignore[method-assign]
    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        run(tmp_path / "cut", dying, dying.build(specs, BACKBONE))
    fresh_method = make_method("packnet", OPTIONS)
    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoints
    resumed = run(tmp_path / "cut", fresh_method, fresh_method.build(specs, BACKBONE), resume=True)
    assert_same_state(ref, resumed)


def test_checkpoint_for_another_network_is_refused(tmp_path):
    ts = make_taskset(n_train=16)
    method = make_method("packnet", OPTIONS)
    torch.manual_seed(0)
    model = method.build(task_specs(ts), BACKBONE)
    Trainer(method, model, ts, cfg(max_steps_per_epoch=1), 0, tmp_path, {}, log=lambda s: None).fit()
    wider = method.build(task_specs(ts), BACKBONE.model_copy(update={"width": 0.5}))
    ck = load_checkpoint(tmp_path / "model")
    with pytest.raises(CheckpointError, match="saved for a different network") as e:
        load_model_state(wider, ck.model_state, "model.json")
    assert "\n" not in str(e.value)
    same = method.build(task_specs(ts), BACKBONE)
    assert isinstance(same, PackNetModel)
    load_model_state(same, ck.model_state, "model.json")
    for (n, a), (_, b) in zip(model.ownership.items(), same.ownership.items(), strict=True):
        assert torch.equal(a, b), n


CLI_CONFIG = {
    "seed": 0,
    "data": {
        "tasks": [
            {
                "name": name,
                "dataset": "synthetic",
                "options": {"num_classes": 3, "size": 8, "num_train": 48, "num_test": 24, "seed": seed},
            }
            for name, seed in (("a", 1), ("b", 2))
        ]
    },
    "model": {"name": "resnet", "depth": 8, "width": 0.25, "feature_size": 8},
    "method": {"name": "packnet", "prune_ratios": [0.5], "retrain_epochs": 1, "retrain_lr": 0.01},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "threads": 1},
}


def test_cli_train_and_sequence_eval(tmp_path, capsys):
    path = tmp_path / "packnet.yaml"
    path.write_text(yaml.safe_dump({**CLI_CONFIG, "output_dir": str(tmp_path / "run")}))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    png = tmp_path / "seq.png"
    model_json = str(tmp_path / "run" / "model.json")
    assert main(["eval", model_json, "--sequence", "--json", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert png.is_file()
    a_errors = {r["after_phase"]: r["error"] for r in rows if r["task"] == "a"}
    assert sorted(a_errors) == [0, 1, 2]  # task-a (pruned), task-a-retrain, task-b
    assert a_errors[2] == a_errors[1]  # adding task b changes task a by exactly 0.00
    assert main(["eval", model_json, "--sequence"]) == 0
    table = capsys.readouterr().out
    assert "| after adding | a error (%) | b error (%) |" in table
    assert main(["eval", model_json, "--no-latency", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["ownership_bits_per_weight"] == 2 and summary["owned_weights"]["free"] == 0
    loaded = api.load(model_json)
    assert loaded.model.added == ["a", "b"]
    assert summary["storage_bytes"] == loaded.model.storage()["total"]
    assert loaded.model.storage()["ownership_bits"] == 2


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("packnet_*.yaml")), ids=str
)
def test_example_configs_validate(path):
    config = RunConfig.load(path)
    method = make_method(config.method.name, config.method.options())
    tasks = [t["name"] for t in config.to_dict()["data"]["tasks"]]
    assert [p.name for p in method.phases(tasks)][-1] == f"task-{tasks[-1]}"


def test_init_from_a_checkpoint_starts_from_its_trunk(tmp_path):
    ts = make_taskset(n_train=16)
    method = make_method("finetune")
    torch.manual_seed(0)
    source = method.build(task_specs(ts), BACKBONE)
    Trainer(method, source, ts, cfg(max_steps_per_epoch=1), 0, tmp_path, {}, log=lambda s: None).fit()
    packnet = make_method("packnet", {**OPTIONS, "init_from": str(tmp_path / "model.json")})
    torch.manual_seed(1)
    model = packnet.build(task_specs(ts), BACKBONE)
    for k, v in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("name", "options"),
    [("vgg", {"depth": 11, "width": 0.25, "hidden": [32]}), ("resnet", {"depth": 20, "width": 0.5})],
)
def test_the_default_batch_norm_from_scratch_does_not_diverge(name, options):
    """Issue 15: with batch norm frozen after task 1 (the paper's choice for a pre-trained first task), a
    network trained from scratch has no normalisation left for task 2, and the freed weights trained at the
    first task's learning rate can blow up within a few steps (docs/methods/packnet.md, "Frozen BatchNorm").
    The default from scratch keeps batch norm per task and stays finite; frozen stays available.

    Whether the frozen run blows up on this toy problem depends on the CPU's float arithmetic (it did on
    one machine for both backbones, on another only for ResNet), so the test does not require it: when it
    does, it must be in the second task's phase, where frozen batch norm leaves the new weights
    unnormalised."""
    ts = make_taskset(shapes=((1, 14), (1, 14)), classes=4, n_train=256)
    specs = task_specs(ts)
    backbone = validate(BackboneConfig, {"name": name, "feature_size": 14, **options})
    train = cfg(
        epochs=2,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        checkpoint_every=0,
        nonfinite_loss="stop",
    )
    base = {"prune_ratios": [0.9], "retrain_epochs": 1, "retrain_lr": 0.005}

    frozen = make_method("packnet", {**base, "task_specific_bn": False})
    torch.manual_seed(0)
    model = frozen.build(specs, backbone)
    try:
        Trainer(frozen, model, ts, train, 0, None, {}, log=lambda s: None).fit()
    except TrainingError as e:
        assert "phase task-t1," in str(e), e  # never the first task, whose batch norm still learns

    method = make_method("packnet", base)
    assert method.config.task_specific_bn is None and method.config.bn_per_task()
    torch.manual_seed(0)
    model = method.build(specs, backbone)
    assert model.task_specific_bn
    Trainer(method, model, ts, train, 0, None, {}, log=lambda s: None).fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        for s in specs:
            assert torch.isfinite(model(batch_of(s), s.name)).all()
    # a pre-trained first task (init_from) keeps the paper's frozen batch norm by default
    assert not PackNetConfig(init_from="runs/x/model.json").bn_per_task()
    assert PackNetConfig(init_from="runs/x/model.json", task_specific_bn=True).bn_per_task()
