"""kill -9 during training, then ``--resume``: the final weights are bit-equal to an uninterrupted run's.

Each run is a separate Python process (SIGKILL leaves no chance to clean up): killed at a training step
chosen by a seed, or between the two renames that publish a checkpoint (the tensor file renamed, the
sidecar not yet), where resume must fall back to the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DRIVER = r"""
import json, os, signal, sys
import virtnet.storage as storage
from virtnet import api
from virtnet.methods.dvn import DVN

kill_step = int(os.environ.get("KILL_STEP", "0"))
kill_rename = int(os.environ.get("KILL_RENAME", "0"))
calls = {"step": 0, "rename": 0}
step = DVN.training_step

def training_step(self, model, batches, phase):
    calls["step"] += 1
    if calls["step"] == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, model, batches, phase)

DVN.training_step = training_step
replace = storage.os.replace

def replacing(src, dst):
    replace(src, dst)
    if str(dst).endswith("last.safetensors"):
        calls["rename"] += 1
        if calls["rename"] == kill_rename:  # the tensor file is in place, its sidecar is not
            os.kill(os.getpid(), signal.SIGKILL)

storage.os.replace = replacing
api.train(json.loads(sys.argv[1]), resume=sys.argv[2] == "1", log=lambda s: None)
"""


def _config(out: Path) -> dict:
    opts = {"num_classes": 3, "size": 8, "num_train": 40, "num_test": 8}
    task = {"dataset": "synthetic", "options": opts}
    return {
        "seed": 5,
        "output_dir": str(out),
        "data": {"tasks": [{"name": "a", **task}, {"name": "b", **task, "options": {**opts, "seed": 1}}]},
        "model": {"name": "resnet", "depth": 8, "width": 0.25},
        "method": {"name": "dvn"},
        "train": {"epochs": 3, "batch_size": 8, "lr": 0.05, "eval_every": 0, "checkpoint_every_steps": 1},
        "cost": {"measure_latency": False},
    }


def _run(driver: Path, out: Path, resume: bool, **kill: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VIRTNET_THREADS": "1"}
    env.update({f"KILL_{k.upper()}": str(v) for k, v in kill.items()})
    args = [sys.executable, str(driver), json.dumps(_config(out)), "1" if resume else "0"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300).returncode


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    assert _run(driver, root / "ref", resume=False) == 0
    return driver, root, _weights(root / "ref")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_at_a_random_step_then_resume_is_bit_equal(setup, seed):
    driver, root, ref = setup
    out = root / f"step{seed}"
    kill_step = random.Random(seed).randint(2, 14)  # 3 epochs of 5 steps
    assert _run(driver, out, resume=False, step=kill_step) == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    assert _run(driver, out, resume=True) == 0
    _assert_same(ref, _weights(out))
    assert not list((out / "checkpoints").glob(".*")), "stale temporary files were left"


def test_kill_between_the_two_renames_falls_back_and_is_bit_equal(setup):
    driver, root, ref = setup
    out = root / "rename"
    assert _run(driver, out, resume=False, rename=4) == -signal.SIGKILL
    ck = out / "checkpoints"
    # the crash left a new tensor file beside the old sidecar: that pair fails its hash
    assert (ck / "last.safetensors").is_file() and (ck / "last.prev.json").is_file()
    assert _run(driver, out, resume=True) == 0
    _assert_same(ref, _weights(out))
