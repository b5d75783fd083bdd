"""Public entry points validate their inputs; threads follow the documented rule; latency says when it
was measured under contention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_taskset

from virtnet import threads
from virtnet.cost import latency
from virtnet.data.core import ArrayDataset, Task, TaskSet
from virtnet.errors import ConfigError, DataError
from virtnet.inputs import check_taskset, prepare_inputs
from virtnet.protocol import TaskSpec

SPEC = TaskSpec("t", 1, 2, 3, (0.5,), (0.25,))


def test_dtypes_follow_the_documented_rule():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    assert prepare_inputs(x, SPEC) is x  # float32: as it is
    out = prepare_inputs(x.double(), SPEC)
    assert out.dtype == torch.float32 and torch.equal(out, x)
    u = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    # (u / 255 - 0.5) / 0.25: 0 -> -2, 255 -> 2, 51 -> -1.2, 102 -> -0.4
    expected = torch.tensor([[[[-2.0, 2.0], [-1.2, -0.4]]]])
    assert torch.allclose(prepare_inputs(u, SPEC), expected, atol=1e-6)
    plain = TaskSpec("p", 1, 2, 3)  # no recorded normalisation: only scaled
    assert torch.allclose(prepare_inputs(u, plain), u.float() / 255)
    a = np.zeros((1, 1, 2, 2), dtype=np.float32)
    assert torch.equal(prepare_inputs(a, SPEC), torch.zeros(1, 1, 2, 2))
    for dt in (torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool):
        with pytest.raises(DataError, match=f"x: dtype {dt} is not accepted"):
            prepare_inputs(x.to(dt), SPEC)
    with pytest.raises(DataError, match="x: expected a torch.Tensor or a numpy array, got list"):
        prepare_inputs([[0.0]], SPEC)


def test_shapes_empty_batches_and_non_finite_values():
    with pytest.raises(DataError, match=r"x: task 't': 3 channels, the task has 1 \(shape \(1, 3, 2, 2\)\)"):
        prepare_inputs(torch.zeros(1, 3, 2, 2), SPEC)
    with pytest.raises(DataError, match=r"x: task 't': 4x4 inputs, the task takes 2x2"):
        prepare_inputs(torch.zeros(1, 1, 4, 4), SPEC)
    with pytest.raises(DataError, match=r"add a batch dimension"):
        prepare_inputs(torch.zeros(1, 2, 2), SPEC)
    with pytest.raises(DataError, match=r"x: empty batch \(shape \(0, 1, 2, 2\)\)"):
        prepare_inputs(torch.zeros(0, 1, 2, 2), SPEC)
    x = torch.zeros(2, 1, 2, 2)
    x[1, 0, 0, 0] = float("nan")
    x[0, 0, 1, 1] = float("inf")
    with pytest.raises(DataError, match="x: 2 NaN or infinite values"):
        prepare_inputs(x, SPEC)
    assert prepare_inputs(x, SPEC, allow_nonfinite=True) is x
    with pytest.raises(DataError, match="x: on cpu, the model is on meta"):
        prepare_inputs(torch.zeros(1, 1, 2, 2), SPEC, device="meta")


def _task(labels, kind="multiclass", n=3):
    ds = ArrayDataset(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels)
    return Task("digits", ds, ds, n, kind=kind)


def test_user_task_set_labels_are_checked_before_training():
    check_taskset(make_taskset())
    with pytest.raises(DataError) as e:
        check_taskset(TaskSet([_task(torch.tensor([0, 1, 7]))]))
    assert str(e.value) == "task 'digits' (train split): label 7 is out of range for 3 classes (0..2)"
    with pytest.raises(DataError, match="label -1 is out of range"):
        check_taskset(TaskSet([_task(torch.tensor([0, -1, 2]))]))
    with pytest.raises(DataError, match=r"class labels must be an integer tensor, got torch.float32"):
        check_taskset(TaskSet([_task(torch.tensor([0.0, 1.0, 2.0]))]))
    with pytest.raises(DataError, match=r"multilabel targets must be 0 or 1, found 2.0"):
        check_taskset(TaskSet([_task(torch.tensor([[0.0, 2.0, 1.0]]), "multilabel")]))


def test_api_train_refuses_bad_labels_before_training(tmp_path):
    from virtnet import api

    ts = TaskSet([_task(torch.tensor([0, 1, 5, 2]))])
    cfg = {
        "data": {"tasks": [{"name": "digits", "dataset": "synthetic"}]},
        "model": {"name": "resnet", "depth": 8, "width": 0.5, "feature_size": 8},
        "train": {"epochs": 1, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    with pytest.raises(DataError, match="task 'digits' \\(train split\\): label 5 is out of range"):
        api.train(cfg, taskset=ts)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---- threads ---------------------------------------------------------------------------------------
def test_thread_rule_and_overrides(monkeypatch):
    assert [threads.rule(2, b) for b in (0.0, 0.4, 0.6, 1.0, 2.0, 5.0)] == [2, 2, 1, 1, 1, 1]
    assert threads.rule(16, 3.2) == 13 and threads.rule(1, 0.0) == 1
    monkeypatch.setenv("VIRTNET_THREADS", "3")
    assert threads.choose() == threads.ThreadChoice(3, "env", threads.usable_cores())
    assert threads.choose(2).threads == 2 and threads.choose(2).source == "explicit"
    monkeypatch.setenv("VIRTNET_THREADS", "zero")
    with pytest.raises(ConfigError, match="VIRTNET_THREADS: must be a positive integer, got 'zero'"):
        threads.choose()
    monkeypatch.delenv("VIRTNET_THREADS")
    monkeypatch.setattr(threads, "busy_cores", lambda s=0.1: 1.0)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    c = threads.choose()
    assert (c.threads, c.source, c.busy) == (1, "rule", 1.0)
    assert c.describe() == "1 threads (2 usable cores, 1.0 busy)"


def test_apply_default_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("VIRTNET_THREADS", "1")
    try:
        assert threads.apply_default(None).threads == 1 and torch.get_num_threads() == 1
        assert threads.apply_default(2).threads == 2 and torch.get_num_threads() == 2
        assert threads.apply_default(None, once=True).threads == 2  # kept: already chosen
    finally:
        torch.set_num_threads(before)


def test_busy_cores_is_within_the_usable_cores():
    b = threads.busy_cores(0.02)
    assert 0.0 <= b <= threads.usable_cores()


def test_latency_reports_contention(monkeypatch):
    net = torch.nn.Conv2d(1, 2, 3)
    out = latency.measure_latency(net, (1, 8, 8), threads=1, repeats=3, warmup=1)
    assert set(out) >= {"contended", "runqueue_wait", "cpu_per_wall"}
    seq = iter([(1000, 0), (2000, 3000)])  # 1 us ran, 3 us waited for a core: 75 % waiting
    monkeypatch.setattr(latency, "_schedstat", lambda: next(seq))
    out = latency.measure_latency(net, (1, 8, 8), threads=1, repeats=3, warmup=1)
    assert out["contended"] is True and out["runqueue_wait"] == 0.75
    calls = iter([(0, 0), (1000, 0)] * 4)
    monkeypatch.setattr(latency, "_schedstat", lambda: next(calls))
    prof = latency.latency_profile(net, (1, 8, 8), batch_sizes=(1, 2), threads=1, repeats=2, warmup=0)
    assert prof["contended"] is False and prof["runqueue_wait"] == 0.0
