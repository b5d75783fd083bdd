"""Deployed exports (ONNX and pt2) for every registered method (generated from the registry, on the
contract test's tiny scenario): for every (task, level), the deployed network fed raw [0, 1] pixels gives
the in-library forward on the normalised pixels, to 1e-5, in PyTorch and in onnxruntime.

Exporting with this torch's default ONNX exporter costs seconds per network, so the default run checks
every (task, level) of every method in eager PyTorch (the deployed module: the normalisation, then the
export) and, through the files and onnxruntime, one ONNX file per method (its last task's largest level),
DVN's level 1, pt2 files of DVN's levels and the CLI; ``test_every_level_through_the_files`` (marked
slow) writes an ONNX and a pt2 file for every (method, task, level).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from virtnet import api
from virtnet.errors import CheckpointError, ConfigError
from virtnet.export import onnx as deploy
from virtnet.methods import method_names
from virtnet.protocol import TaskSpec

sys.path.insert(0, str(Path(__file__).parent))
from test_contract import _config  # noqa: E402  (the contract test's tiny scenario)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name in method_names():
        d = tmp_path_factory.mktemp(name.replace("-", "_"))
        out[name] = api.train(_config(name, str(d)), log=lambda s: None)
    return out


def _pixels(spec, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, spec.in_channels, spec.input_size, spec.input_size, generator=g)


def _expected(run, task: str, level: int, u: torch.Tensor) -> torch.Tensor:
    """The in-library forward on the normalised pixels (in eval mode: a run's model comes back from
    training in training mode, and a test run alone would otherwise compare batch statistics)."""
    run.model.eval()
    with torch.no_grad():
        return run.method.predict(run.model, deploy.normalise(u, run.model.spec(task)), task, level)


def _pairs(runs):
    for name, run in runs.items():
        run.model.eval()
        for task in run.model.tasks:
            for lv in run.method.levels(run.model, task):
                yield name, run, task, lv.index


def test_every_method_and_level_in_eager_pytorch(runs):
    pairs = list(_pairs(runs))
    assert {p[0] for p in pairs} == set(method_names())
    for i, (name, run, task, level) in enumerate(pairs):
        spec = run.model.spec(task)
        net = deploy.deployable(run.method.export(run.model, task, level), spec)
        u = _pixels(spec, n=2 + i % 3, seed=i)
        with torch.no_grad():
            got = net(u)
        torch.testing.assert_close(got, _expected(run, task, level, u), **TOL, msg=f"{name} {task}@{level}")


@pytest.mark.parametrize("name", method_names())
def test_every_method_in_onnxruntime(runs, name, tmp_path):
    """One ONNX file per method (its last task's largest level) through the real path; every (task, level)
    of every method is the slow test's."""
    run = runs[name]
    loaded = api.load(run.out_dir / "model.json")
    task = loaded.model.tasks[-1]
    level = loaded.method.levels(loaded.model, task)[-1].index
    path = api.export_network(loaded, task, level, tmp_path / "net", format="onnx")
    dep = api.load_deployed(path)
    u = _pixels(dep.spec, 4)
    np.testing.assert_allclose(dep(u), _expected(run, task, level, u).numpy(), **TOL)


@pytest.fixture(scope="module")
def dvn_files(runs, tmp_path_factory):
    run = runs["dvn"]
    loaded = api.load(run.out_dir / "model.json")
    d = tmp_path_factory.mktemp("files")
    files = {}
    # ONNX exports cost seconds each: level 1 here (the largest level is the per-method test's), pt2 for all
    files[("onnx", 1)] = api.export_network(loaded, "b", 1, d / "b1", format="onnx")
    for lv in loaded.method.levels(loaded.model, "b"):
        files[("pt2", lv.index)] = api.export_network(loaded, "b", lv.index, d / f"b{lv.index}", format="pt2")
    return loaded, files


def test_files_answer_like_the_library_with_a_free_batch(runs, dvn_files):
    loaded, files = dvn_files
    run = runs["dvn"]
    for (fmt, level), path in files.items():
        assert path.suffix == f".{fmt}" and path.is_file()
        assert not list(path.parent.glob("*.data"))  # the weights are in the one file
        dep = api.load_deployed(path)
        assert dep.format == fmt and dep.level == level and dep.spec == loaded.model.spec("b")
        assert dep.meta["method"] == "dvn" and "[0, 1]" in dep.meta["input"]
        for n in (1, 5):
            u = _pixels(dep.spec, n, seed=n)
            np.testing.assert_allclose(dep(u), _expected(run, "b", level, u).numpy(), **TOL)


def test_the_onnx_file_holds_only_the_level_weights(dvn_files):
    import onnx
    from onnx import numpy_helper

    loaded, files = dvn_files
    for (fmt, level), path in files.items():
        if fmt != "onnx":
            continue
        model = onnx.load(str(path))
        stored = sum(numpy_helper.to_array(t).size for t in model.graph.initializer)
        params = sum(p.numel() for p in loaded.method.export(loaded.model, "b", level).parameters())
        net = loaded.method.export(loaded.model, "b", level)
        buffers = sum(b.numel() for b in net.buffers())
        # the sliced weights, BN statistics (often folded into the convolutions) and the normalisation
        assert stored <= params + buffers + 2 * loaded.model.spec("b").in_channels
        assert stored < sum(p.numel() for p in loaded.model.parameters())


def test_safetensors_pairs_read_as_deployed_networks_too(runs, tmp_path):
    run = runs["joint"]
    loaded = api.load(run.out_dir / "model.json")
    path = api.export_network(loaded, "b", 1, tmp_path / "b")
    dep = api.load_deployed(path)
    u = _pixels(dep.spec, 4)
    np.testing.assert_allclose(dep(u), _expected(run, "b", 1, u).numpy(), **TOL)


def test_cli_export_formats(runs, tmp_path, capsys):
    from virtnet.cli import main

    ck = str(runs["dvn"].out_dir / "model.json")
    args = ["export", ck, "--task", "a", "--budget", "level=1", "--format", "onnx", "--external-data"]
    assert main([*args, "-o", str(tmp_path / "ext")]) == 0
    assert "ext.onnx" in capsys.readouterr().out
    assert (tmp_path / "ext.onnx.data").is_file() or list(tmp_path.glob("ext*.data"))
    u = _pixels(runs["dvn"].model.spec("a"))
    np.testing.assert_allclose(
        api.load_deployed(tmp_path / "ext.onnx")(u), _expected(runs["dvn"], "a", 1, u).numpy(), **TOL
    )


def test_bad_input_is_one_line(runs, dvn_files, tmp_path, capsys):
    from virtnet.cli import main

    ck = str(runs["dvn"].out_dir / "model.json")
    bad = tmp_path / "bad.onnx"
    good = dvn_files[1][("onnx", 1)]
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a valid ONNX file"):
        api.load_deployed(bad)
    bad.write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError, match="not a valid ONNX file"):
        api.load_deployed(bad)
    with pytest.raises(CheckpointError, match="not a valid pt2"):
        (tmp_path / "bad.pt2").write_bytes(b"zip?")
        api.load_deployed(tmp_path / "bad.pt2")
    cases = [
        ["export", ck, "--task", "a", "--budget", "params=3", "--format", "onnx", "-o", str(tmp_path / "x")],
        ["export", ck, "--task", "zz", "--format", "onnx", "-o", str(tmp_path / "x")],
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("virtnet: error:") and "\n" not in err
    with pytest.raises(ConfigError, match="unsupported export format"):
        deploy.check_format("tflite")


class DataDependent(nn.Module):
    """A network whose Python control flow depends on the input's values: no graph format can hold it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:
            return x.flatten(1)[:, :3]
        return -x.flatten(1)[:, :3]


def test_a_network_a_format_cannot_hold_is_a_one_line_error(tmp_path):
    spec = TaskSpec("t", 1, 4, 3)
    for export in (deploy.export_onnx, deploy.export_pt2):
        with pytest.raises(ConfigError, match="method 'x' task 't' level 1: cannot be exported") as e:
            export(DataDependent(), spec, tmp_path / "t.bin", what="method 'x' task 't' level 1")
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_every_level_through_the_files(runs, tmp_path):
    for name, run, task, level in _pairs(runs):
        loaded = api.load(run.out_dir / "model.json")
        spec = loaded.model.spec(task)
        u = _pixels(spec, 3)
        want = _expected(run, task, level, u).numpy()
        for fmt in ("onnx", "pt2"):
            path = api.export_network(loaded, task, level, tmp_path / f"{name}_{task}_{level}", format=fmt)
            np.testing.assert_allclose(api.load_deployed(path)(u), want, err_msg=f"{name} {fmt}", **TOL)
