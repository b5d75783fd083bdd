"""The ``adapters`` method end to end on data made here (synthetic datasets): starting exactly at the
pretrained network, frozen universal weights after training, fused exports, checkpoints, placements,
weight decay by size, the CLI and the errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from virtnet import api
from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import BackboneConfig
from virtnet.cli import main
from virtnet.data.config import DataConfig, build_taskset
from virtnet.errors import CheckpointError, ConfigError, TaskError
from virtnet.methods import Phase, make_method
from virtnet.methods.adapters import AdapterNet, Adapters, AdaptersConfig
from virtnet.nn.adapters import AdapterConv, DomainBatchNorm
from virtnet.train import TrainConfig, Trainer
from virtnet.train.checkpoint import load_checkpoint

MODEL = {"name": "resnet26", "width": 0.125}
TRAIN = {
    "epochs": 1,
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "progress": False,
    "eval_every": 0,
    "checkpoint_every": 0,
    "threads": 1,
}
SPECS = [TaskSpec("src", 1, 8, 3), TaskSpec("b", 1, 6, 4), TaskSpec("c", 3, 8, 2)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def task(name: str, seed: int, classes: int = 3, size: int = 8, channels: int = 1) -> dict:
    options = {"num_classes": classes, "size": size, "channels": channels, "num_train": 64, "num_test": 32}
    return {"name": name, "dataset": "synthetic", "options": {**options, "seed": seed}}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A universal network pretrained on the synthetic task 'src' (8x8, 3 classes)."""
    out = tmp_path_factory.mktemp("source")
    config = {
        "output_dir": str(out),
        "data": {"tasks": [task("src", 0)]},
        "model": MODEL,
        "method": {"name": "joint", "shared_stem": True},
        "train": {**TRAIN, "epochs": 2},
    }
    api.train(config, log=lambda s: None)
    return str(out / "model.json")


def build(source: str, specs=SPECS, **options) -> AdapterNet:
    method = make_method("adapters", {"init_from": source, **options})
    torch.manual_seed(0)
    return method.build(specs, BackboneConfig(**MODEL))


def checkpoint_name(name: str) -> str:
    """The pretrained checkpoint's name of a universal parameter of an AdapterNet."""
    return name.replace("input.body.", "stems.shared.").replace(".conv.weight", ".weight")


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "parallel"},
        {"kind": "series"},
        {"kind": "parallel", "placement": "half", "compression": "svd"},
    ],
)
def test_alpha_zero_gives_exactly_the_pretrained_network(source, options):
    pretrained = api.load(source).model
    model = build(source, **options).eval()
    x = torch.randn(6, 1, 8, 8)
    expected = pretrained(x, "src")
    assert torch.equal(model(x, "src"), expected)
    with torch.no_grad():  # another domain's adapters change nothing for 'src'
        for bank in model.banks():
            bank.alphas["b"].normal_()
        assert torch.equal(model(x, "src"), expected)  # the eval path without autograd (folded, cached)
        assert torch.equal(model(x, "src"), expected)  # ... served from the cache
    assert torch.equal(model(x, "src"), expected)
    assert model.one_network == sum(p.numel() for p in pretrained.parameters())


@pytest.mark.parametrize("kind", ["parallel", "series"])
def test_training_freezes_the_universal_weights_and_exports_fused_networks(source, kind, tmp_path):
    ck = load_checkpoint(source)
    options = {"kind": kind, "init_from": source, "dropout": 0.2}
    if kind == "parallel":
        options.update(compression="svd", svd_fraction=0.5)
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {"tasks": [task("b", 1, classes=4, size=6), task("c", 2, classes=2, channels=3)]},
        "model": MODEL,
        "method": {"name": "adapters", **options},
        "train": {**TRAIN, "epochs": 2},
    }
    run = api.train(config, log=lambda s: None)
    model = run.model
    assert isinstance(model, AdapterNet)
    universal = {n for n, p in model.named_parameters() if any(p is q for q in model.universal_parameters())}
    assert universal and all(".adapter." not in n and ".norms." not in n for n in universal)
    for name, p in model.named_parameters():
        if name in universal:
            assert torch.equal(p, ck.model_state[checkpoint_name(name)]), name
    for bank in model.banks():
        for d in ("b", "c"):
            if d in bank.domains:
                assert bank.alphas[d].abs().sum() > 0  # the adapters did train
    bn = model.trunk.bn.norm("b")
    assert not torch.equal(bn.running_mean, ck.model_state["trunk.bn.running_mean"])
    assert "c" in model.own_stems and "c" not in model.input.body.bn.norms  # 3 channels: its own stem
    if kind == "parallel":
        for bank in model.banks():  # beta is the SVD's and stayed fixed; gamma_t was fine-tuned after it
            if bank.rank is not None:
                stacked = torch.cat([bank.alphas[d] for d in bank.domains], dim=1)  # frozen since the SVD
                u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
                k = bank.rank
                assert torch.equal(bank.beta, u[:, :k] * s[:k])
                c = bank.in_channels
                for i, d in enumerate(bank.domains):
                    assert not torch.equal(bank.gammas[d], vh[:k, i * c : (i + 1) * c].t()), d
        # the stem's adapters (one input channel, one domain: a single singular value) stay full rank
        assert [bool(b.compressed) for b in model.banks()] == [b.rank is not None for b in model.banks()]
        assert (
            model.input.body.conv.adapter.rank is None
            and sum(b.rank is not None for b in model.banks()) == 24
        )
        counts = model.parameter_counts()
        assert counts["shared_adapters"] == sum(b.beta.numel() for b in model.banks() if b.rank is not None)
        assert counts["per_domain"]["b"] == sum(p.numel() for p in model.domain_parameters("b"))

    model.eval()
    loaded = api.load(run.out_dir / "model.json")  # buffers (statistics, compressed flags) included
    for name, shape in (("b", (5, 1, 6, 6)), ("c", (5, 3, 8, 8))):
        x = torch.randn(*shape)
        ref = model(x, name)
        assert torch.equal(loaded.model(x, name), ref)
        net = run.method.export(model, name)
        assert not any(isinstance(m, (*AdapterConv, DomainBatchNorm)) for m in net.modules())
        assert all(n.split(".")[0] in ("stem", "trunk", "head") for n, _ in net.named_parameters())
        assert torch.allclose(net(x), ref, atol=1e-5)
        # the fused network has the plain network's layers: a series adapter's bias went into the next BN
        assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        src = api.load(source)
        plain = src.method.export(src.model, "src")
        n_plain = sum(p.numel() for p in plain.trunk.parameters())
        assert sum(p.numel() for p in net.trunk.parameters()) == n_plain


def test_param_groups_weight_decay_by_size_and_compression_phases(source):
    method = make_method("adapters", {"init_from": source, "compression": "svd"})
    torch.manual_seed(0)
    model = method.build(SPECS, BackboneConfig(**MODEL))
    phases = method.phases([s.name for s in SPECS])
    assert [p.name for p in phases] == [
        "adapt-src",
        "adapt-b",
        "adapt-c",
        "compress-src",
        "compress-b",
        "compress-c",
    ]
    universal = {id(p) for p in model.universal_parameters()}
    assert not any(p.requires_grad for p in model.universal_parameters())
    for size, decay in ((1437, 0.002), (7999, 0.002), (8000, 0.0005), (34999, 0.0005), (60000, 0.0001)):
        phase = Phase("adapt-b", ["b"], 1, {"step": "adapt", "train_sizes": {"b": size}})
        (group,) = method.param_groups(model, phase)
        assert group["weight_decay"] == decay
        assert not universal & {id(p) for p in group["params"]}
        assert {id(p) for p in group["params"]} == {id(p) for p in model.domain_parameters("b")}
    method.on_phase_start(model, phases[3])
    (group,) = method.param_groups(
        model, Phase("compress-b", ["b"], 4, {"step": "compress", "train_sizes": {"b": 10}})
    )
    assert [tuple(p.shape) for p in group["params"]] == [
        (b.in_channels, b.rank) for b in model.banks() if "b" in b.domains
    ]
    assert len(group["params"]) == 25  # gamma_b of every layer, the stem's included (T C_in = 2 >= K = 2)
    assert all(p.requires_grad for p in group["params"])  # else the optimizer would never move them
    with pytest.raises(ConfigError, match="by_size' needs the domain's training-set size"):
        method.param_groups(model, Phase("adapt-b", ["b"], 1, {"step": "adapt"}))
    fixed = make_method("adapters", {"init_from": source, "weight_decay": {"b": 0.01}})
    assert fixed.param_groups(model, Phase("adapt-b", ["b"], 1, {}))[0]["weight_decay"] == 0.01


def test_compress_phases_can_tune_the_domain_and_override_epochs_and_lr(source):
    method = make_method(
        "adapters",
        {
            "init_from": source,
            "compression": "svd",
            "compress_tune": "domain",
            "compress_epochs": 3,
            "compress_lr": 0.01,
        },
    )
    torch.manual_seed(0)
    model = method.build(SPECS, BackboneConfig(**MODEL))
    phases = method.phases([s.name for s in SPECS])
    assert all("epochs" not in p.info and "lr" not in p.info for p in phases[:3])  # adapt: train.*
    assert [(p.info["epochs"], p.info["lr"]) for p in phases[3:]] == [(3, 0.01)] * 3
    method.on_phase_start(model, phases[3])
    (group,) = method.param_groups(
        model, Phase("compress-b", ["b"], 4, {"step": "compress", "train_sizes": {"b": 10}})
    )
    gammas = [b.gammas["b"] for b in model.banks() if "b" in b.domains]
    rest = model.domain_parameters("b", adapters=False, rest=True)
    assert {id(p) for p in group["params"]} == {id(p) for p in gammas + rest}
    assert len(group["params"]) == len(gammas) + len(rest)  # no parameter twice
    assert not {id(p) for p in model.universal_parameters()} & {id(p) for p in group["params"]}
    assert not {id(b.beta) for b in model.banks()} & {id(p) for p in group["params"]}  # beta stays fixed
    with pytest.raises(ValueError, match="compression is 'none'"):
        AdaptersConfig(compress_tune="domain")
    with pytest.raises(ValueError, match="compress_epochs"):
        AdaptersConfig(compression="svd", compress_epochs=0)


def test_placements_choose_layers_by_name(source):
    def names(**options) -> list[str]:
        return build(source, specs=SPECS[:2], **options).adapted

    every = names()
    assert len(every) == 25 and every[0] == "input.body.conv"  # the stem and 2 x 12 block convolutions
    early, mid, late = names(placement="early"), names(placement="mid"), names(placement="late")
    assert early == ["input.body.conv"] + [f"trunk.blocks.{i}.conv{j}" for i in range(4) for j in (1, 2)]
    assert mid == [f"trunk.blocks.{i}.conv{j}" for i in range(4, 8) for j in (1, 2)]
    assert late == [f"trunk.blocks.{i}.conv{j}" for i in range(8, 12) for j in (1, 2)]
    assert names(placement="half") == [f"trunk.blocks.{i}.conv2" for i in range(12)]
    assert names(layers=["trunk.blocks.1?.conv1"]) == ["trunk.blocks.10.conv1", "trunk.blocks.11.conv1"]
    model = build(source, specs=SPECS[:2], dropout=0.3)
    drops = {n: m.dropout for n, m in model.adapter_layers()}
    assert drops["trunk.blocks.3.conv2"] == 0.3 and drops["trunk.blocks.3.conv1"] == 0.0
    assert drops["input.body.conv"] == 0.0


def test_bad_input_is_a_clear_error(source, tmp_path):
    with pytest.raises(ConfigError, match="K = 100 is larger than C = 4 of layer 'input.body.conv'"):
        build(source, compression="svd", svd_rank=100)
    model = build(source, specs=SPECS[:2]).eval()
    with pytest.raises(TaskError, match="domain 'zz' has no adapters"):
        model(torch.randn(1, 1, 8, 8), "zz")
    method = make_method("adapters", {"init_from": source})
    with pytest.raises(TaskError, match="domain 'zz' has no adapters"):
        method.export(model, "zz")
    with pytest.raises(CheckpointError, match="saved for a different network"):
        make_method("adapters", {"init_from": source}).build(
            SPECS, BackboneConfig(name="resnet26", width=0.25)
        )
    with pytest.raises(ConfigError, match="svd_rank is set but compression is 'none'"):
        make_method("adapters", {"svd_rank": 2})
    with pytest.raises(ConfigError, match="'trunk.nope' matches no module"):
        build(source, layers=["trunk.nope"])


def test_cli_train_and_eval_print_mean_score_and_parameters(source, tmp_path, capsys):
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {"tasks": [task("b", 1, classes=4, size=6), task("d", 3)]},
        "model": MODEL,
        "method": {
            "name": "adapters",
            "kind": "parallel",
            "init_from": source,
            "score_baseline": {"b": 50.0, "d": 50.0},
        },
        "train": TRAIN,
    }
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "model.json"), "--no-latency"]) == 0
    out = capsys.readouterr().out
    for key in ("mean accuracy (%)", "decathlon score", "parameters relative to one network"):
        assert f"{key}: " in out, out
    assert main(["eval", str(tmp_path / "run" / "model.json"), "--no-latency", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert isinstance(summary["decathlon score"], float)
    assert summary["parameters (total)"] > summary["parameters (universal)"]


class Interrupt(Exception):
    pass


def test_resume_inside_a_compression_phase_ends_with_the_same_weights(source, tmp_path):
    """The model's structure (factors, compressed flags) is fixed at build, so a run stopped after the SVD
    resumes from its checkpoints to exactly the weights of a run never stopped."""
    data = DataConfig.model_validate({"tasks": [task("b", 1, classes=4, size=6), task("d", 3)]})
    taskset = build_taskset(data, 0)
    options = {"init_from": source, "compression": "svd"}
    train = TrainConfig(**{**TRAIN, "checkpoint_every_steps": 1})

    class Dying(Adapters):
        """Dies at the second step of the last phase (compress-d), after a mid-phase checkpoint."""

        calls = 0

        def training_step(self, model, batches, phase):
            if phase.name == "compress-d":
                if Dying.calls == 1:
                    raise Interrupt
                Dying.calls += 1
            return super().training_step(model, batches, phase)

    def fit(method: Adapters, out, resume: bool = False) -> AdapterNet:
        torch.manual_seed(0)
        model = method.build(api.task_specs(taskset), BackboneConfig(**MODEL))
        Trainer(method, model, taskset, train, 0, out, {}, log=lambda s: None).fit(resume=resume)
        return model

    ref = fit(Adapters(AdaptersConfig(**options)), tmp_path / "ref")
    with pytest.raises(Interrupt):
        fit(Dying(AdaptersConfig(**options)), tmp_path / "cut")
    resumed = fit(Adapters(AdaptersConfig(**options)), tmp_path / "cut", resume=True)
    sa, sb = ref.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
