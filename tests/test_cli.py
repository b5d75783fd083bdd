"""End-to-end runs of the `virtnet` command into tmp_path: files written, JSON keys, one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from virtnet import api
from virtnet.cli import main

CONFIG = {
    "seed": 0,
    "data": {
        "sampling": "all",
        "tasks": [
            {
                "name": "a",
                "dataset": "synthetic",
                "options": {"num_classes": 3, "size": 8, "num_train": 48, "num_test": 24, "seed": 1},
            },
            {
                "name": "b",
                "dataset": "synthetic",
                "options": {
                    "num_classes": 4,
                    "channels": 3,
                    "size": 12,
                    "num_train": 48,
                    "num_test": 24,
                    "seed": 2,
                },
            },
        ],
    },
    "model": {"name": "resnet", "depth": 8, "width": 0.5, "feature_size": 8},
    "method": {"name": "joint"},
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "progress": False},
}


def write(tmp_path, cfg, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_train_eval_info_round_trip(tmp_path, capsys):
    cfg = write(tmp_path, {**CONFIG, "output_dir": str(tmp_path / "run")})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    for f in (
        "model.json",
        "model.safetensors",
        "metrics.jsonl",
        "config.json",
        "checkpoints/last.json",
        "checkpoints/last.safetensors",
    ):
        assert (run / f).is_file(), f
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {x["event"] for x in lines}
    assert all("loss" in x for x in lines if x["event"] == "train")
    capsys.readouterr()

    assert (
        main(["eval", str(run / "model.json"), "--json", "--repeats", "2", "--plot", str(tmp_path / "p.png")])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "joint"
    assert [(r["task"], r["level"]) for r in out["rows"]] == [("a", 1), ("b", 1)]
    for r in out["rows"]:
        for key in ("accuracy", "params", "flops", "density", "latency_ms_b1", "latency_ms_b64", "bytes"):
            assert key in r, key
        assert r["params"] == r["shared_params"] + r["task_params"]
    assert (tmp_path / "p.png").stat().st_size > 0

    stem = tmp_path / "report"
    assert main(["eval", str(run / "model.json"), "--no-latency", "--report", str(stem)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["seed"] == 0 and "command" in rep and len(rep["rows"]) == 2
    assert {"method", "scenario", "task", "level", "accuracy", "params", "flops"} <= set(rep["rows"][0])
    assert (tmp_path / "report.csv").read_text().count("\n") == 3
    assert (tmp_path / "report.md").is_file()
    capsys.readouterr()

    assert main(["info", str(run / "model.json"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in info["tasks"]] == ["a", "b"]
    assert (
        info["total_params"]
        == sum(r["task_params"] for r in info["budgets"]) + info["budgets"][0]["shared_params"]
    )


def test_eval_measures_latency_as_the_runs_cost_section_says(tmp_path, capsys):
    cost = {"batch_sizes": [2, 3], "repeats": 1, "warmup": 0, "threads": 1}
    cfg = write(tmp_path, {**CONFIG, "output_dir": str(tmp_path / "run"), "cost": cost})
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "model.json"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert {k for k in row if k.startswith("latency_ms_b") and k.count("_") == 2} == {
        "latency_ms_b2",
        "latency_ms_b3",
    }
    assert row["threads"] == 1
    assert main(["eval", str(tmp_path / "run" / "model.json")]) == 0
    assert "latency b2 (ms) | latency b3 (ms)" in capsys.readouterr().out
    off = write(tmp_path, {**CONFIG, "output_dir": str(tmp_path / "off"), "cost": {"measure_latency": False}})
    assert main(["train", str(off)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "off" / "model.json"), "--json"]) == 0
    assert not any(k.startswith("latency") for k in json.loads(capsys.readouterr().out)["rows"][0])


def test_resume_via_cli_runs_nothing_more_when_done(tmp_path, capsys):
    cfg = write(tmp_path, {**CONFIG, "output_dir": str(tmp_path / "run")})
    assert main(["train", str(cfg)]) == 0
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert main(["train", str(cfg), "--resume"]) == 0
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"train": {"epochs": 2, "nesterov": True, "colour": "red"}}, "train.colour: unknown key"),
        ({"train": {"epochs": "many"}}, "train.epochs: Input should be a valid integer"),
        ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
        ({"method": {"name": "nope"}}, "unknown method 'nope'"),
        ({"method": {"name": "joint", "shared_stems": True}}, "method.shared_stems: unknown key"),
        ({"model": {"name": "resnet", "depth": 21}}, "model.depth"),
    ],
)
def test_bad_configs_are_one_line_errors_naming_the_key(tmp_path, capsys, patch, message):
    cfg = write(tmp_path, {**CONFIG, **patch})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert message in err, err
    assert str(cfg) in err


def test_missing_checkpoint_and_altered_weights(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.json")]) == 2
    assert "not found" in capsys.readouterr().err
    cfg = write(
        tmp_path, {**CONFIG, "output_dir": str(tmp_path / "run"), "train": {**CONFIG["train"], "epochs": 1}}
    )
    assert main(["train", str(cfg)]) == 0
    t = tmp_path / "run" / "model.safetensors"
    data = bytearray(t.read_bytes())
    data[-5] ^= 1
    t.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["info", str(tmp_path / "run" / "model.json")]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err


def test_toml_and_yaml_configs_are_equal(tmp_path):
    from virtnet.config import RunConfig

    toml = tmp_path / "run.toml"
    toml.write_text(
        'seed = 0\n[model]\nname = "resnet"\ndepth = 8\n[method]\nname = "joint"\n[train]\nepochs = 3\n'
        '[data.scenario]\nkind = "split_classes"\ndataset = "digits"\nnum_tasks = 2\n'
    )
    yml = write(
        tmp_path,
        {
            "seed": 0,
            "model": {"name": "resnet", "depth": 8},
            "method": {"name": "joint"},
            "train": {"epochs": 3},
            "data": {"scenario": {"kind": "split_classes", "dataset": "digits", "num_tasks": 2}},
        },
    )
    assert RunConfig.load(toml).to_dict() == RunConfig.load(yml).to_dict()


def test_demo_runs_end_to_end_quickly(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--set", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "accuracy (%)" in out and "FLOPs (2 per MAC)" in out
    assert (tmp_path / "demo" / "accuracy_vs_density.png").stat().st_size > 0
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())["rows"]
    assert len(rows) >= 2


def test_sequence_matrix_after_each_added_task(tmp_path, capsys):
    cfg = {**CONFIG, "output_dir": str(tmp_path / "seq"), "method": {"name": "finetune"}}
    assert main(["train", str(write(tmp_path, cfg))]) == 0
    for k in (0, 1):
        assert (tmp_path / "seq" / "checkpoints" / f"phase-{k}.json").is_file()
    capsys.readouterr()
    png = tmp_path / "m.png"
    assert (
        main(["eval", str(tmp_path / "seq" / "model.json"), "--sequence", "--json", "--plot", str(png)]) == 0
    )
    rows = json.loads(capsys.readouterr().out)["rows"]
    # after task a: only a is evaluated; after task b: a and b
    assert [(r["after_task"], r["task"]) for r in rows] == [("a", "a"), ("b", "a"), ("b", "b")]
    for r in rows:
        assert r["error"] == pytest.approx(100 - r["accuracy"])
    assert png.stat().st_size > 0
    assert main(["eval", str(tmp_path / "seq" / "model.json"), "--sequence"]) == 0
    out = capsys.readouterr().out
    assert "| after adding | a error (%) | b error (%) |" in out
    first = [line for line in out.splitlines() if line.startswith("| a |")][0]
    assert first.endswith("| - |")  # task b is not learned yet after adding a


def test_info_and_eval_describe_an_exported_network(tmp_path, capsys):
    cfg = write(tmp_path, {**CONFIG, "output_dir": str(tmp_path / "run")})
    assert main(["train", str(cfg)]) == 0
    stem = tmp_path / "a_net"
    assert main(["export", str(tmp_path / "run"), "--task", "a", "-o", str(stem)]) == 0
    capsys.readouterr()
    for command in ("info", "eval"):
        assert main([command, str(stem) + ".json", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["task"]["name"] == "a" and info["level"] == 1 and info["format"] == "safetensors"
        net = api.read_exported(stem).network
        assert info["parameters"] == sum(p.numel() for p in net.parameters()) and info["flops"] > 0
    assert main(["info", str(stem) + ".safetensors"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exported network:") and "saved for a different network" not in out


def test_eval_says_when_latency_was_measured_under_contention(tmp_path, capsys, monkeypatch):
    cfg = write(tmp_path, {**CONFIG, "output_dir": str(tmp_path / "run")})
    assert main(["train", str(cfg)]) == 0
    import virtnet.cost.report as report

    real = report.latency_profile

    def busy(*args, **kwargs):
        prof = real(*args, **kwargs)
        return {**prof, "contended": True, "runqueue_wait": 0.5}

    monkeypatch.setattr(report, "latency_profile", busy)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "note: latency of 2 row(s) measured while other processes held the cores" in out
    assert "up to 50% of the time" in out
    assert main(["eval", str(tmp_path / "run"), "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert all(r["contended"] is True and r["runqueue_wait"] == 0.5 for r in rows)


def test_an_exported_sidecar_is_checked_against_its_schema(tmp_path):
    from virtnet.errors import CheckpointError
    from virtnet.storage import write_pair

    cfg = write(tmp_path, {**CONFIG, "output_dir": str(tmp_path / "run")})
    assert main(["train", str(cfg)]) == 0
    stem = tmp_path / "net"
    loaded = api.load(tmp_path / "run")
    api.export_network(loaded, "a", 1, stem)
    meta = json.loads((tmp_path / "net.json").read_text())
    tensors = load_file(str(tmp_path / "net.safetensors"))
    keep = {k: v for k, v in meta.items() if k not in ("sha256", "num_bytes")}
    for change, message in (
        ({"level": "1"}, "level: "),
        ({"level": 0}, "level: "),
        ({"task": {**meta["task"], "in_channels": "x"}}, "task.in_channels: "),
        ({"parameters": True}, "parameters: "),
    ):
        bad = tmp_path / "bad"
        write_pair(bad, tensors, {**keep, **change})
        with pytest.raises(CheckpointError, match=message) as err:
            api.read_exported(bad)
        assert "\n" not in str(err.value)
