"""The method contract, tested for every registered method (no hand-written list: a method added to the
registry is tested here without editing this file).

For each method, on a tiny scenario of two synthetic tasks with its default options: two training steps
through the one loop; save -> load with no phase replay -> outputs ``torch.equal``; for every (task,
level): the exported network's output equals ``predict`` (1e-5), ``torch.export`` accepts it, its
self-describing files rebuild it without the config, and the model's ``parameter_usage`` counts exactly
the values the export stores (nonzero values for exports that keep a dense shape with zeros).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from virtnet import api
from virtnet.errors import CheckpointError
from virtnet.methods import Method, method_names, register
from virtnet.methods.base import _REGISTRY
from virtnet.protocol import MultiTaskModel, usage_count

MODEL = {"name": "resnet", "depth": 8, "width": 0.25}


def _task(name: str, seed: int, channels: int = 1) -> dict:
    options = {"num_classes": 3, "size": 8, "channels": channels, "num_train": 32, "num_test": 16}
    return {"name": name, "dataset": "synthetic", "options": {**options, "seed": seed}}


def _config(method: str, out: str) -> dict:
    return {
        "seed": 3,
        "output_dir": out,
        "data": {"tasks": [_task("a", 0), _task("b", 1, channels=3)]},
        "model": MODEL,
        "method": {"name": method},
        "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 2, "lr": 0.05, "eval_every": 0},
        "cost": {"measure_latency": False},
    }


@pytest.fixture(scope="module", params=method_names())
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param.replace("-", "_"))
    run = api.train(_config(request.param, str(out)), log=lambda s: None)
    return request.param, run


def _inputs(spec, n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, spec.in_channels, spec.input_size, spec.input_size, generator=g)


def test_the_model_implements_the_protocol(trained):
    name, run = trained
    assert isinstance(run.model, MultiTaskModel)
    assert isinstance(run.model, type(run.method).Model)
    assert run.model.tasks == ["a", "b"]
    assert run.model.spec("b").in_channels == 3
    assert len(run.model.spec("a").mean) == 1  # the normalisation travels with the model


def test_save_load_gives_equal_outputs_without_replay(trained, monkeypatch):
    name, run = trained
    # loading must not replay any phase: make every phase hook fail
    cls = type(run.method)
    monkeypatch.setattr(cls, "on_phase_start", lambda *a, **k: pytest.fail("phase replayed"))
    monkeypatch.setattr(cls, "on_phase_end", lambda *a, **k: pytest.fail("phase replayed"))
    loaded = api.load(run.out_dir / "model.json")
    run.model.eval()
    for task in run.model.tasks:
        x = _inputs(run.model.spec(task))
        for lv in run.method.levels(run.model, task):
            with torch.no_grad():
                want = run.method.predict(run.model, x, task, lv.index)
                got = loaded.method.predict(loaded.model, x, task, lv.index)
            assert torch.equal(want, got), (name, task, lv.index)


def test_every_level_exports_equal_small_and_exportable(trained, tmp_path):
    name, run = trained
    run.model.eval()
    for task in run.model.tasks:
        x = _inputs(run.model.spec(task))
        for lv in run.method.levels(run.model, task):
            net = run.method.export(run.model, task, lv.index)
            with torch.no_grad():
                want = run.method.predict(run.model, x, task, lv.index)
                got = net(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            program = torch.export.export(net, (x,))
            torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
            # the exported files describe the network: no config, no method needed to rebuild it
            loaded = api.load(run.out_dir / "model.json")
            stem = tmp_path / f"{task}_{lv.index}"
            api.export_network(loaded, task, lv.index, stem)
            ex = api.read_exported(stem)
            assert ex.spec == run.model.spec(task) and ex.level == lv.index
            with torch.no_grad():
                assert torch.equal(ex.network(x), net(x))


def test_parameter_usage_counts_the_exported_values(trained):
    name, run = trained
    names = dict(run.model.named_parameters())
    for task in run.model.tasks:
        for lv in run.method.levels(run.model, task):
            usage = run.model.parameter_usage(task, lv.index)
            assert set(usage) <= set(names), set(usage) - set(names)
            for k, m in usage.items():
                assert m.dtype == torch.bool and m.shape == names[k].shape
            net = run.method.export(run.model, task, lv.index)
            stored = sum(p.numel() for p in net.parameters())
            nonzero = sum(int((p != 0).sum()) for p in net.parameters())
            used = usage_count(usage)
            if run.method.export_fuses:
                assert nonzero <= used  # fusion folds several stored values into one
            else:
                assert nonzero <= used <= stored
                assert used in (stored, nonzero), (name, task, lv.index, used, stored, nonzero)


def test_a_structure_that_does_not_match_is_refused(trained, tmp_path):
    name, run = trained
    meta = json.loads((run.out_dir / "model.json").read_text())
    structure = run.model.structure()
    assert meta["structure"] == json.loads(json.dumps(structure))
    bad = dict(meta)
    bad["structure"] = {**structure, "no_such_key": 1}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(bad))
    (tmp_path / "model.safetensors").write_bytes((run.out_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="structure"):
        api.load(path)


def test_a_method_whose_model_lacks_the_protocol_is_refused_at_registration():
    class NotAModel(nn.Module):
        pass

    class Partial(nn.Module, MultiTaskModel):
        @property
        def tasks(self) -> list[str]:
            return []

    for model in (NotAModel, Partial, object):

        class Broken(Method):
            name = "broken-for-test"
            Model = model

        with pytest.raises(TypeError, match="broken-for-test"):
            register(Broken)
        assert "broken-for-test" not in _REGISTRY
