"""The model protocol's pieces: task specs carry their normalisation, structures rebuild models exactly,
exported networks describe themselves (and refuse what they cannot describe)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from virtnet import api
from virtnet.backbones.registry import BackboneConfig
from virtnet.errors import CheckpointError, DataError
from virtnet.export.network import describe, rebuild
from virtnet.methods import make_method
from virtnet.protocol import TaskSpec, check_structure, union_usage, usage_count


def test_task_spec_validates_and_round_trips():
    s = TaskSpec("a", 3, 8, 10, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert TaskSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(DataError, match="in_channels"):
        TaskSpec("a", 0, 8, 10)
    with pytest.raises(DataError, match="in_channels"):
        TaskSpec("a", True, 8, 10)
    with pytest.raises(DataError, match="mean has 2 values for 3"):
        TaskSpec("a", 3, 8, 10, (0.1, 0.2), (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="std must be positive"):
        TaskSpec("a", 1, 8, 10, (0.1,), (0.0,))


def test_check_structure_names_the_differing_keys():
    check_structure({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2]})
    with pytest.raises(CheckpointError, match=r"b: saved \[1\], built \[1, 2\]"):
        check_structure({"a": 1, "b": [1]}, {"a": 1, "b": [1, 2]})
    with pytest.raises(CheckpointError, match="expected a mapping"):
        check_structure([1], {})  # type: ignore[arg-type]


def test_union_usage_counts_shared_values_once():
    a = {"w": torch.tensor([True, True, False]), "h": torch.tensor([True])}
    b = {"w": torch.tensor([False, True, True])}
    assert usage_count(union_usage([a, b])) == 3 + 1


def _dvn(mode: str = "sequential"):
    specs = [TaskSpec("a", 1, 8, 3), TaskSpec("b", 1, 8, 3)]
    method = make_method("dvn", {"mode": mode})
    torch.manual_seed(0)
    model = method.create(specs, BackboneConfig(name="resnet", depth=8, width=0.25))
    return method, specs, model


def test_sequential_dvn_structure_rebuilds_the_units_in_use():
    method, specs, model = _dvn()
    assert model.structure()["active_units"] == 1
    model.active_units.fill_(2)
    structure = json.loads(json.dumps(model.structure()))
    again = method.create(specs, BackboneConfig(name="resnet", depth=8, width=0.25), structure)
    assert int(again.active_units) == 2 and again.levels("b") == [1, 2]
    with pytest.raises(CheckpointError, match="active_units"):
        method.create(
            specs, BackboneConfig(name="resnet", depth=8, width=0.25), {**structure, "active_units": 3}
        )
    with pytest.raises(CheckpointError, match="orders"):
        method.create(
            specs,
            BackboneConfig(name="resnet", depth=8, width=0.25),
            {**structure, "orders": {"a": [1, 0], "b": [1, 0]}},
        )


def test_evaluation_uses_the_models_normalisation(tmp_path):
    task = {"dataset": "synthetic", "options": {"num_classes": 3, "size": 8, "num_train": 48, "num_test": 48}}
    cfg = {
        "output_dir": str(tmp_path),
        "data": {"tasks": [{"name": "a", **task}]},
        "model": {"name": "resnet", "depth": 8, "width": 0.25},
        "method": {"name": "joint"},
        "train": {"epochs": 2, "batch_size": 16, "eval_every": 0},
    }
    run = api.train(cfg, log=lambda s: None)
    loaded = api.load(tmp_path / "model.json")
    ts = run.taskset
    assert loaded.specs[0].mean == ts["a"].mean and loaded.specs[0].std == ts["a"].std
    other = type(ts)([dataclasses.replace(t, mean=(0.9,), std=(0.05,)) for t in ts], ts.name)
    # a task set with other statistics is evaluated as the model was trained ...
    assert api.evaluate_model(loaded, other) == api.evaluate_model(loaded, ts)
    # ... which matters: fed with those statistics the logits differ
    batch = ts["a"].test.images[:8].float().div(255)  # (8, 1, 8, 8) in [0, 1]
    x_model = (batch - ts["a"].mean[0]) / ts["a"].std[0]
    x_other = (batch - 0.9) / 0.05
    with torch.no_grad():
        assert not torch.allclose(loaded.model(x_model, "a"), loaded.model(x_other, "a"))


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.table = object()


def test_describe_refuses_what_it_cannot_rebuild():
    with pytest.raises(CheckpointError, match="class test_protocol._Odd is not a torch.nn or virtnet"):
        describe(_Odd())
    odd = nn.Linear(2, 2)
    odd.table = object()
    with pytest.raises(CheckpointError, match="network.table: an exported network cannot hold a object"):
        describe(odd)
    desc = describe(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    assert isinstance(rebuild(json.loads(json.dumps(desc))), nn.Sequential)
    bad = {**desc, "class": "os.system"}
    with pytest.raises(CheckpointError, match="not a torch.nn or virtnet module"):
        rebuild(bad)


def test_children_keep_their_order_through_a_sorted_json_writer():
    net = nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)]).eval()  # "10" sorts before "2"
    desc = json.loads(json.dumps(describe(net), sort_keys=True))
    again = rebuild(desc)
    again.load_state_dict(net.state_dict())
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
