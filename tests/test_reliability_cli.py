"""CLI hygiene: ``python -m virtnet``, run folders where a checkpoint is expected, plot formats checked
before any work, a closed stdout ends quietly, ``--allow-changes`` only with ``--resume``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from virtnet.cli import main

CONFIG = {
    "seed": 0,
    "data": {
        "tasks": [
            {
                "name": "a",
                "dataset": "synthetic",
                "options": {"num_classes": 3, "size": 8, "num_train": 32, "num_test": 16, "seed": 1},
            }
        ]
    },
    "model": {"name": "resnet", "depth": 8, "width": 0.25, "feature_size": 8},
    "method": {"name": "joint"},
    "train": {"epochs": 1, "batch_size": 16, "progress": False},
    "cost": {"batch_sizes": [1], "repeats": 2, "warmup": 0},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "run.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(d / "run")}))
    assert main(["train", str(cfg)]) == 0
    return d / "run"


def _env():
    return {**os.environ, "VIRTNET_THREADS": "1", "OMP_NUM_THREADS": "1"}


def test_python_dash_m_virtnet():
    cmd = [sys.executable, "-m", "virtnet", "--help"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert p.returncode == 0 and "usage: virtnet" in p.stdout


def test_run_folder_is_accepted_by_eval_and_info(run, capsys):
    assert main(["info", str(run), "--json"]) == 0
    out = capsys.readouterr().out
    assert str(run / "model.json") in out
    assert main(["eval", str(run), "--no-latency", "--json"]) == 0
    assert '"rows"' in capsys.readouterr().out


def test_unsupported_plot_format_is_refused_before_any_work(tmp_path, capsys):
    # the checkpoint does not even exist: the plot format is checked first
    assert main(["eval", str(tmp_path / "nothing"), "--plot", str(tmp_path / "a.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"virtnet: error: --plot {tmp_path / 'a.txt'}: unsupported plot format '.txt' "
        "(use .png, .pdf, .svg, .jpg, .jpeg)"
    )


def test_allow_changes_needs_resume(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    assert main(["train", str(cfg), "--allow-changes", "train.lr"]) == 2
    assert "--allow-changes: only with --resume" in capsys.readouterr().err


def test_resume_with_changed_options_is_refused_by_the_cli(run, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(run)}))
    assert main(["train", str(cfg), "--resume", "--set", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.lr (0.1 -> 0.5)" in err and "--allow-changes train.lr" in err


def test_closed_stdout_ends_quietly_in_process(run, monkeypatch, capsys):
    r, w = os.pipe()
    os.close(r)  # the reader went away (`| head -1` after its line)
    out = open(w, "w", buffering=1 << 16)  # noqa: SIM115 - closed by the test
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["info", str(run), "--json"]) == 0  # not a BrokenPipeError traceback
    finally:
        monkeypatch.undo()
        try:
            out.close()
        except OSError:  # pragma: no cover
            pass
    assert capsys.readouterr().err == ""


def test_closed_stdout_ends_quietly(run):
    cmd = f"{sys.executable} -m virtnet info {run} --json | head -c 10"
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=_env())
    assert p.returncode == 0 and p.stdout == '{\n  "check' and p.stderr == "", p.stderr
