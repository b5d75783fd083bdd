"""Hostile configs end in one-line ConfigErrors naming the file and key; resuming with options that change
what the weights mean is refused unless allowed, and then recorded with the step it took effect at."""

from __future__ import annotations

import copy
import json
import re

import pytest
from conftest import make_taskset

from virtnet import api
from virtnet.config import (
    MAX_PARAMS,
    RunConfig,
    check_model_size,
    estimate_model_size,
    prepare_output_dir,
    read_config_file,
    record_changes,
)
from virtnet.errors import ConfigError
from virtnet.schema import MAX_UNITS, check_num_units

BASE = {
    "seed": 0,
    "data": {
        "tasks": [
            {
                "name": "a",
                "dataset": "synthetic",
                "options": {"num_classes": 3, "size": 8, "num_train": 48, "num_test": 24, "seed": 1},
            }
        ]
    },
    "model": {"name": "resnet", "depth": 8, "width": 0.5, "feature_size": 8},
    "method": {"name": "joint"},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False},
}


def load(patch_path: str, value, source="run.yaml"):
    d = copy.deepcopy(BASE)
    *parents, last = patch_path.split(".")
    cur = d
    for p in parents:
        cur = cur.setdefault(p, {})
    cur[last] = value
    return RunConfig.from_dict(d, source=source)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seed", 2**70, "seed: must be an integer from 0 to 2**63-1, got 1180591620717411303424"),
        ("seed", -1, "seed: must be an integer from 0 to 2**63-1, got -1"),
        ("seed", True, "seed: must be an integer from 0 to 2**63-1, got True"),
        ("train.epochs", True, "train.epochs: Input should be a valid integer, not a boolean"),
        ("train.epochs", 1e30, "train.epochs: Input should be a valid integer, got the number 1e+30"),
        ("train.epochs", 10**30, "train.epochs: integer too large (at most 9223372036854775807)"),
        ("train.epochs", 2_000_000, "train.epochs: Input should be less than or equal to 1000000"),
        ("train.batch_size", 1e20, "train.batch_size: Input should be a valid integer, got the number"),
        ("train.batch_size", 2**21, "train.batch_size: Input should be less than or equal to 1048576"),
        ("train.nesterov", 1, "train.nesterov: Input should be a valid boolean (true or false), got 1"),
        ("train.lr", True, "train.lr: Input should be a valid number, not a boolean"),
        ("train.lr", float("inf"), "train.lr: Input should be a finite number"),
        ("cost.threads", True, "cost.threads: Input should be a valid integer, not a boolean"),
        ("model.width", 1e9, "model: about 2.95e+23 parameters (width 1000000000.0, depth 8) exceed"),
        ("model.feature_size", 1_000_000, "model.feature_size: training would need about"),
        ("method.num_units", 10**12, "method."),
    ],
)
def test_hostile_values_are_one_line_errors(key, value, message):
    if key == "method.num_units":
        d = copy.deepcopy(BASE)
        d["method"] = {"name": "dvn", "num_units": value}
        with pytest.raises(ConfigError) as e:
            RunConfig.from_dict(d, source="run.yaml")
    else:
        with pytest.raises(ConfigError) as e:
            load(key, value)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("run.yaml: " + message), str(e.value)


def test_yaml_file_problems(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_bytes(b"seed: 1\ntrain:\n  epochs: \xff\xfe\n")
    with pytest.raises(ConfigError) as e:
        read_config_file(p)
    assert str(e.value) == f"{p}: not UTF-8 text (invalid byte 0xff at offset 25)"
    p.write_text("seed: 1\ntrain:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        read_config_file(p)
    assert str(e.value) == f"{p}: not valid YAML: duplicate key 'epochs' (first at line 3) (line 5, column 3)"
    p.write_text("base: &b {lr: 0.1}\ntrain:\n  <<: *b\n  lr: 0.2\n")  # a merge then an override: fine
    assert read_config_file(p)["train"] == {"lr": 0.2}
    j = tmp_path / "run.json"
    j.write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(ConfigError, match=r"run.json: not valid JSON: duplicate key 'seed'"):
        read_config_file(j)


def test_yaml_1e30_string_is_not_an_integer(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(json.dumps(BASE).replace('"epochs": 1', '"epochs": "1e30"'))
    with pytest.raises(ConfigError, match=r"train.epochs: Input should be a valid integer, got the string"):
        RunConfig.load(p)


def test_model_size_estimate_is_an_upper_bound_close_to_the_real_count():
    from virtnet.backbones.registry import BackboneConfig, build_backbone

    cfg = BackboneConfig(name="resnet", depth=20)
    real = sum(p.numel() for p in build_backbone(cfg, 32).parameters())
    est = estimate_model_size(cfg, 32, 64)
    assert real == 271_360 and est["params"] == 20 * 9 * 64 * 64  # 737,280: 2.7x the real count
    assert est["activation_bytes"] == 64 * 16 * 32 * 32 * 4 * 20
    with pytest.raises(ConfigError, match=re.escape(f"exceed the limit of {MAX_PARAMS:.0e}")):
        check_model_size(BackboneConfig(name="wrn", depth=28, widen_factor=10, width=8.0), 32)


def test_num_units_helper_bounds_before_any_list_is_built():
    assert check_num_units(4) == 4
    cases = ((10**12, f"between 1 and {MAX_UNITS}, got 1000000000000"), (True, "integer"), (0, "between"))
    for bad, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            check_num_units(bad)


def test_output_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError) as e:
        prepare_output_dir(f)
    assert str(e.value) == f"output_dir: {f} is a file, not a folder"
    with pytest.raises(ConfigError) as e:
        prepare_output_dir(f / "run")
    assert str(e.value) == f"output_dir: {f / 'run'} cannot be created: {f} is a file"
    assert prepare_output_dir(tmp_path / "a" / "b").is_dir()


# ---- resume keeps its record ------------------------------------------------------------------------
def test_record_changes_refuses_then_records():
    prev = RunConfig.from_dict(BASE)
    new_d = copy.deepcopy(BASE)
    new_d["train"].update(lr=0.5, epochs=4, log_every=3)
    new_d["output_dir"] = "elsewhere"
    new = RunConfig.from_dict(new_d)
    with pytest.raises(ConfigError) as e:
        record_changes(prev, new, step=6, source="run/config.json")
    assert str(e.value) == (
        "run/config.json: resuming with options that change what the weights mean: train.epochs (1 -> 4), "
        "train.lr (0.05 -> 0.5); resume with the run's own options, or record the change with "
        "--allow-changes train.epochs train.lr"
    )
    with pytest.raises(ConfigError, match="train.epochs"):
        record_changes(prev, new, step=6, allow=["train.lr"])
    rec = record_changes(prev, new, step=6, allow=["train"])
    assert rec.train.lr == 0.5 and rec.train.epochs == 4 and rec.output_dir == "elsewhere"
    d = rec.to_dict()
    assert d["train"]["lr"] == 0.05 and d["train"]["epochs"] == 1  # the original, as first trained
    assert d["train"]["log_every"] == 3 and d["output_dir"] == "elsewhere"  # free keys: as they are now
    assert d["changes"] == [
        {"key": "train.epochs", "old": 1, "new": 4, "step": 6},
        {"key": "train.lr", "old": 0.05, "new": 0.5, "step": 6},
    ]
    again = RunConfig.from_dict(json.loads(json.dumps(d)))  # config.json read back
    assert again.train.lr == 0.5 and again.changes == d["changes"] and again.to_dict() == d
    # a second resume with the same options changes nothing more
    assert record_changes(again, new, step=9).to_dict()["changes"] == d["changes"]


def test_api_train_resume_refuses_changed_options_then_records_them(tmp_path):
    ts = make_taskset()
    d = copy.deepcopy(BASE)
    d["output_dir"] = str(tmp_path / "run")
    d["train"]["max_steps_per_epoch"] = 2
    api.train(d, taskset=ts)
    last = json.loads((tmp_path / "run" / "checkpoints" / "last.json").read_text())
    step = last["state"]["global_step"]
    assert step == 2
    changed = copy.deepcopy(d)
    changed["train"]["lr"] = 0.5
    with pytest.raises(ConfigError, match=r"config.json: resuming with options .* train.lr \(0.05 -> 0.5\)"):
        api.train(changed, resume=True, taskset=ts)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 0.05
    api.train(changed, resume=True, taskset=ts, allow_changes=["train.lr"])
    rec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rec["train"]["lr"] == 0.05
    assert rec["changes"] == [{"key": "train.lr", "old": 0.05, "new": 0.5, "step": 2}]
    model = json.loads((tmp_path / "run" / "model.json").read_text())
    assert model["config"]["changes"] == rec["changes"]
