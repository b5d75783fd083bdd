"""Data-parallel training (gloo on the CPU): every registered method trains through DDP at world size 1,
and two processes on localhost give what the README's rules promise:

* BatchNorm layers in eval mode (no batch statistics): the same weights as one process with the same
  global batch, to 1e-5 (DVN, PackNet, adapters, joint training);
* BatchNorm in training mode (each rank normalises with its own shard): identical weights and buffers on
  both ranks, and the buffers are the mean of the ranks' (exactly: see ``Runtime.average_buffers``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_taskset
from safetensors.torch import load_file, save_file

from virtnet.api import task_specs
from virtnet.backbones.registry import BackboneConfig
from virtnet.methods import make_method, method_names
from virtnet.train import TrainConfig, Trainer
from virtnet.train.runtime import Runtime

BACKBONE = BackboneConfig(name="resnet", depth=8, width=0.5, feature_size=8)
OPTIONS: dict[str, dict] = {"dvn": {"num_units": 2}, "nestednet": {"num_units": 2}}
TWO_PROCESS = ["dvn", "packnet", "adapters", "joint"]


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=0.05, progress=False, eval_every=0, checkpoint_every=0, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def build(name: str, ts, bn_eval: bool = False, options: dict | None = None):
    method = make_method(name, options if options is not None else OPTIONS.get(name))
    if bn_eval:  # a test-only variant: BatchNorm layers use their running statistics while training
        original = method.training_step

        def step(model, batches, phase):
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            return original(model, batches, phase)

        method.training_step = step  # type: ignore[method-assign]
    torch.manual_seed(0)
    return method, method.build(task_specs(ts), BACKBONE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield Runtime.from_env()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "name,options", [(n, None) for n in method_names()] + [("den", {"task_bn": "private"})]
)
def test_every_method_trains_ddp_steps_at_world_size_1(name, options, world_of_one):
    """Also DEN with batch norm per task (trunks with tied parameters under DDP)."""
    assert world_of_one.distributed and world_of_one.world_size == 1
    ts = make_taskset()
    method, model = build(name, ts, options=options)
    tr = Trainer(
        method, model, ts, cfg(max_steps_per_epoch=2), 0, None, runtime=world_of_one, log=lambda s: None
    )
    before = [p.detach().clone() for p in model.parameters()]
    summary = tr.fit()
    assert summary["global_step"] == 2 * len(summary["phases"])  # two steps of every phase, through DDP
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


# ---- two processes ---------------------------------------------------------------------------------
def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rt = Runtime.from_env()
        ts = make_taskset()
        for name in TWO_PROCESS:  # BatchNorm in eval mode: comparable with one process
            method, model = build(name, ts, bn_eval=True)
            Trainer(method, model, ts, cfg(epochs=1), 0, None, runtime=rt, log=lambda s: None).fit()
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}-{rank}.safetensors"
            )
        method, model = build("joint", ts)  # BatchNorm in training mode: the rule
        Trainer(method, model, ts, cfg(epochs=2), 0, None, runtime=rt, log=lambda s: None).fit()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/bn-{rank}.safetensors")
        bn = torch.nn.BatchNorm1d(3)  # average_buffers: the mean of the ranks' statistics
        bn.running_mean.fill_(float(rank + 1))
        bn.running_var.fill_(float(4 * rank + 1))
        rt.average_buffers(bn)
        save_file({"mean": bn.running_mean, "var": bn.running_var}, f"{out}/avg-{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


@pytest.mark.parametrize("name", TWO_PROCESS)
def test_two_processes_give_the_weights_of_one_at_the_same_global_batch(name, two_processes):
    ts = make_taskset()
    method, model = build(name, ts, bn_eval=True)
    Trainer(method, model, ts, cfg(epochs=1), 0, None, log=lambda s: None).fit()
    ref = model.state_dict()
    r0 = load_file(str(two_processes / f"{name}-0.safetensors"))
    r1 = load_file(str(two_processes / f"{name}-1.safetensors"))
    assert r0.keys() == r1.keys() == ref.keys()
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k  # one model on both ranks
        torch.testing.assert_close(r0[k], ref[k], rtol=0, atol=1e-5, msg=k)
    moved = [
        k
        for k in ref
        if ref[k].is_floating_point() and not torch.equal(ref[k], build(name, ts)[1].state_dict()[k])
    ]
    assert moved  # training did something


def test_with_batchnorm_in_training_mode_every_rank_holds_one_model(two_processes):
    r0 = load_file(str(two_processes / "bn-0.safetensors"))
    r1 = load_file(str(two_processes / "bn-1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # parameters and (averaged) running statistics
    a0 = load_file(str(two_processes / "avg-0.safetensors"))
    a1 = load_file(str(two_processes / "avg-1.safetensors"))
    for a in (a0, a1):
        assert torch.equal(a["mean"], torch.full((3,), 1.5)) and torch.equal(a["var"], torch.full((3,), 3.0))


# ---- torchrun -----------------------------------------------------------------------------------------
RUN = {
    "seed": 0,
    "data": {
        "tasks": [
            {"name": "a", "dataset": "synthetic", "options": {"num_classes": 3, "size": 8, "num_train": 32}},
            {"name": "b", "dataset": "synthetic", "options": {"num_classes": 4, "size": 8, "num_train": 32}},
        ]
    },
    "model": {"name": "resnet", "depth": 8, "width": 0.5, "feature_size": 8},
    "method": {"name": "joint"},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False, "threads": 1, "eval_every": 0},
}


def torchrun(
    tmp_path, *args: str, nodes: int = 1, node_args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    import json
    import shutil

    exe = shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun is not on PATH")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(RUN))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VIRTNET_THREADS": "1"}
    cmd = [
        exe,
        *node_args,
        "-m",
        "virtnet",
        "train",
        str(config),
        "--output-dir",
        str(tmp_path / "out"),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow
def test_torchrun_trains_on_two_processes_and_rank_0_writes_the_files(tmp_path):
    r = torchrun(tmp_path, node_args=("--nproc-per-node", "2", "--master-port", str(free_port())))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("trained on 2 processes") == 1  # rank 0 prints
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"event": "train"' in line]) == 1  # 2 steps, one record, once
    assert (tmp_path / "out" / "model.json").is_file()


@pytest.mark.slow
def test_torchrun_with_a_world_size_that_does_not_divide_the_batch_is_a_one_line_error(tmp_path):
    r = torchrun(
        tmp_path,
        "--set",
        "train.batch_size=15",
        node_args=("--nproc-per-node", "2", "--master-port", str(free_port())),
    )
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("virtnet: error:")]
    assert ours and set(ours) == {
        "virtnet: error: train.batch_size: 15 (the global batch per task) does not divide among 2 processes; "
        "use a multiple of 2"
    }


@pytest.mark.slow
def test_two_nodes_on_localhost_with_the_c10d_rendezvous(tmp_path):
    import threading

    port = free_port()
    results: dict[int, subprocess.CompletedProcess] = {}
    (tmp_path / "n0").mkdir()
    (tmp_path / "n1").mkdir()

    def node(i: int) -> None:
        rdzv = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d")
        rdzv += ("--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "virtnet-test")
        results[i] = torchrun(tmp_path / f"n{i}", node_args=rdzv)

    threads = [threading.Thread(target=node, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert results[i].returncode == 0, results[i].stderr[-2000:]
    written = [i for i in (0, 1) if (tmp_path / f"n{i}" / "out" / "model.json").is_file()]
    assert len(written) == 1  # the node that holds rank 0
