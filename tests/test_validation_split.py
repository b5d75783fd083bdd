"""Validation splits: every task gets one by default (``data.val_fraction``, 0.1), carved from its training
images with a documented seed, and every choice made from data (levels under a shared budget, a plan) is
made on it, never silently on the test split."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from virtnet import api
from virtnet.config import RunConfig
from virtnet.data.config import DEFAULT_VAL_FRACTION, DataConfig, build_taskset
from virtnet.data.datasets import load_synthetic
from virtnet.data.scenarios import make_generator, stratified_take
from virtnet.errors import ConfigError, DataWarning
from virtnet.schema import validate

SYN = {"num_classes": 4, "size": 8, "num_train": 200, "num_test": 40}


def _keys(images: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in images]


def _build(data: dict, seed: int = 0):
    return build_taskset(validate(DataConfig, data, "data"), seed)


# ---- the default split ----------------------------------------------------------------------------------
def test_default_val_split_is_carved_from_train_disjoint_stratified_and_seeded() -> None:
    assert DEFAULT_VAL_FRACTION == 0.1
    full = load_synthetic(**SYN)
    assert len(set(_keys(full.train.images))) == 200  # every image unique: membership by content
    t = _build({"tasks": [{"name": "s", "dataset": "synthetic", "options": SYN}]}, seed=5)[0]
    assert t.val is not None and len(t.val) == 20 and len(t.train) == 180 and len(t.test) == 40
    tr, va, te = (set(_keys(s.images)) for s in (t.train, t.val, t.test))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va == set(_keys(full.train.images))  # train and val partition the official train split
    assert torch.bincount(t.val.labels, minlength=4).tolist() == [5, 5, 5, 5]  # stratified
    # the documented seed: stratified_take with a generator from (run seed, sample key = task name, "val")
    take, _ = stratified_take(full.train.labels, 20, make_generator(5, "s", "val"))
    assert torch.equal(t.val.images, full.train.images[take])
    again = _build({"tasks": [{"name": "s", "dataset": "synthetic", "options": SYN}]}, seed=5)[0]
    assert again.val is not None and torch.equal(again.val.images, t.val.images)
    other = _build({"tasks": [{"name": "s", "dataset": "synthetic", "options": SYN}]}, seed=6)[0]
    assert other.val is not None and set(_keys(other.val.images)) != va
    # mean / std are those of the training images left after the split
    assert t.mean[0] == pytest.approx(float(t.train.images.double().mean()) / 255, abs=1e-9)


def test_tasks_and_scenarios_inherit_the_data_default_or_override_it() -> None:
    ts = _build(
        {
            "val_fraction": 0.25,
            "scenario": {"kind": "split_classes", "dataset": "synthetic", "options": SYN, "num_tasks": 2},
            "tasks": [
                {"name": "own", "dataset": "synthetic", "options": SYN, "val_fraction": 0.05},
                {"name": "none", "dataset": "synthetic", "options": SYN, "val_fraction": 0},
                {"name": "inherits", "dataset": "synthetic", "options": SYN},
            ],
        }
    )
    sizes = {d["task"]: (d["train"], d["val"]) for d in ts.describe()}
    assert sizes == {
        "synthetic_0": (75, 25),
        "synthetic_1": (75, 25),
        "own": (190, 10),
        "none": (200, 0),
        "inherits": (150, 50),
    }
    assert ts["none"].val is None
    sc = _build(
        {
            "val_fraction": 0.25,
            "scenario": {
                "kind": "split_classes",
                "dataset": "synthetic",
                "options": SYN,
                "num_tasks": 2,
                "val_fraction": 0,
            },
        }
    )
    assert [t.val for t in sc] == [None, None]


def test_explicit_zero_turns_the_split_off() -> None:
    ts = _build({"val_fraction": 0, "tasks": [{"name": "s", "dataset": "synthetic", "options": SYN}]})
    assert ts[0].val is None and len(ts[0].train) == 200


def test_configs_of_the_old_schema_still_load() -> None:
    # a config.json written before data.val_fraction: every task records its own val_fraction (0.0 then)
    old = {
        "data": {
            "root": None,
            "sampling": "all",
            "tasks": [
                {"name": "a", "dataset": "synthetic", "options": SYN, "val_fraction": 0.0},
                {"name": "b", "dataset": "synthetic", "options": SYN, "val_fraction": 0.1},
            ],
        }
    }
    cfg = RunConfig.from_dict(old)
    assert cfg.data.val_fraction == DEFAULT_VAL_FRACTION
    ts = build_taskset(cfg.data, 0)
    assert ts["a"].val is None and ts["b"].val is not None and len(ts["b"].val) == 20
    # a run's config.json keeps the distinction between an inherited and an explicit fraction
    written = RunConfig.from_dict({"data": {"tasks": [{"dataset": "digits"}]}}).to_dict()
    assert written["data"]["val_fraction"] == 0.1 and written["data"]["tasks"][0]["val_fraction"] is None


def test_bad_fractions_are_one_line_errors_naming_the_key() -> None:
    def bad(data: dict) -> str:
        with pytest.raises(ConfigError) as e:
            RunConfig.from_dict({"data": data}, source="run.yaml")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "data.val_fraction" in bad({"val_fraction": 1.0, "tasks": [{"dataset": "digits"}]})
    assert "data.tasks[0].val_fraction" in bad({"tasks": [{"dataset": "digits", "val_fraction": -0.1}]})
    assert "data.scenario.val_fraction" in bad(
        {"scenario": {"kind": "datasets", "datasets": ["digits"], "val_fraction": True}}
    )
    # a subsample group compares the fractions its tasks end up with (inherited or their own)
    group = {"dataset": "synthetic", "options": SYN, "subsample_group": "g"}
    x, y = {**group, "name": "x"}, {**group, "name": "y"}
    msg = bad({"val_fraction": 0.2, "tasks": [x, {**y, "val_fraction": 0.1}]})
    assert "tasks[1].val_fraction: 0.1 differs from tasks[0]'s 0.2" in msg
    ok = {"val_fraction": 0.2, "tasks": [x, {**y, "val_fraction": 0.2}]}
    ts = build_taskset(validate(DataConfig, ok), 0)
    assert ts["x"].val is not None and torch.equal(ts["x"].val.images, ts["y"].val.images)  # type: ignore[union-attr]


def test_a_tiny_task_gets_no_default_split_with_a_warning_but_an_explicit_one_is_an_error() -> None:
    tiny = {"num_classes": 2, "size": 8, "num_train": 4, "num_test": 4}
    with pytest.warns(DataWarning, match=r"data.tasks\[0\].val_fraction: the default data.val_fraction 0.1 "):
        ts = _build({"tasks": [{"name": "t", "dataset": "synthetic", "options": tiny}]})
    assert ts[0].val is None and len(ts[0].train) == 4
    with pytest.raises(ConfigError, match=r"data.tasks\[0\].val_fraction: 0.1 of 4 training images leaves 0"):
        _build({"tasks": [{"name": "t", "dataset": "synthetic", "options": tiny, "val_fraction": 0.1}]})
    with warnings.catch_warnings():  # five images: one for val, four for train, no warning
        warnings.simplefilter("error")
        ts = _build({"tasks": [{"name": "t", "dataset": "synthetic", "options": {**tiny, "num_train": 5}}]})
    assert ts[0].val is not None and (len(ts[0].train), len(ts[0].val)) == (4, 1)


# ---- choices on the validation split --------------------------------------------------------------------
def _task(name: str, seed: int) -> dict:
    options = {"num_classes": 3, "size": 8, "num_train": 40, "num_test": 16, "seed": seed}
    return {"name": name, "dataset": "synthetic", "options": options}


def _run_config(out: str, **data: object) -> dict:
    return {
        "seed": 3,
        "output_dir": out,
        "data": {"tasks": [_task("a", 0), _task("b", 1)], **data},
        "model": {"name": "resnet", "depth": 8, "width": 0.25},
        "method": {"name": "dvn", "num_units": 2},
        "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 2, "lr": 0.05, "eval_every": 0},
        "cost": {"measure_latency": False},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny DVN runs (two tasks, two levels each): one with the default validation split, one
    trained with ``data.val_fraction: 0``."""
    out = {}
    for name, data in (("val", {}), ("noval", {"val_fraction": 0})):
        d = tmp_path_factory.mktemp(name)
        run = api.train(_run_config(str(d), **data), log=lambda s: None)
        out[name] = api.load(run.out_dir / "model.json")
    return out


def _fake_accuracy(split: str) -> dict[tuple[str, int], float]:
    """Accuracies under which val and test choose different levels: on val, a's larger level gains most;
    on test, b's."""
    if split == "val":
        return {("a", 1): 50.0, ("a", 2): 90.0, ("b", 1): 50.0, ("b", 2): 55.0}
    return {("a", 1): 50.0, ("a", 2): 55.0, ("b", 1): 50.0, ("b", 2): 90.0}


def _one_large_level_budget(loaded) -> str:
    from virtnet.methods.budget import selection_parameters

    both = selection_parameters(loaded.method, loaded.model, {"a": 2, "b": 2})
    one = max(
        selection_parameters(loaded.method, loaded.model, {"a": 2, "b": 1}),
        selection_parameters(loaded.method, loaded.model, {"a": 1, "b": 2}),
    )
    assert one < both
    return f"params={one}"


def test_shared_budget_chooses_on_the_validation_split(runs, monkeypatch) -> None:
    loaded = runs["val"]
    taskset = loaded.taskset()
    assert all(t.val is not None for t in taskset)
    seen: list[str] = []

    def fake(method, model, ts, split="test", tasks=None, **kw):
        seen.append(split)
        acc = _fake_accuracy(split)
        return [{"task": t, "level": lv, "accuracy": a} for (t, lv), a in acc.items() if t in (tasks or "ab")]

    budget = _one_large_level_budget(loaded)
    monkeypatch.setattr(api, "evaluate", fake)
    out = api.shared_budget(loaded, taskset, budget)
    assert seen == ["val"] and out["selected_on"] == "val"
    assert out["levels"] == {"a": 2, "b": 1}  # the test split would have given {"a": 1, "b": 2}
    assert out["accuracy"] == {"a": 90.0, "b": 50.0}


def test_shared_budget_reports_the_validation_accuracy_of_the_chosen_levels(runs) -> None:
    loaded = runs["val"]
    taskset = loaded.taskset()
    out = api.shared_budget(loaded, taskset, "params=1e9")
    assert out["selected_on"] == "val" and set(out["levels"]) == {"a", "b"}
    val = {(r["task"], r["level"]): r["accuracy"] for r in api.evaluate_model(loaded, taskset, split="val")}
    assert out["accuracy"] == {t: val[(t, lv)] for t, lv in out["levels"].items()}


def test_shared_budget_refuses_a_task_without_a_validation_split(runs, monkeypatch) -> None:
    loaded = runs["noval"]
    taskset = loaded.taskset()
    assert [t.val for t in taskset] == [None, None]
    with pytest.raises(ConfigError) as e:
        api.shared_budget(loaded, taskset, "params=1e9")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tasks 'a', 'b': no validation split")
    assert "val_fraction > 0" in msg and "--allow-test-split" in msg
    with pytest.raises(ConfigError, match="^task 'b': no validation split"):
        api.shared_budget(loaded, taskset, "params=1e9", tasks=["b"])
    # opted in: chosen on the test split, and said so
    seen: list[str] = []

    def fake(method, model, ts, split="test", tasks=None, **kw):
        seen.append(split)
        return [{"task": t, "level": lv, "accuracy": a} for (t, lv), a in _fake_accuracy(split).items()]

    budget = _one_large_level_budget(loaded)
    monkeypatch.setattr(api, "evaluate", fake)
    out = api.shared_budget(loaded, taskset, budget, allow_test=True)
    assert seen == ["test"] and out["selected_on"] == "test" and out["levels"] == {"a": 1, "b": 2}


def test_cli_shared_budget_and_plan_use_val_and_refuse_without_it(runs, capsys) -> None:
    from virtnet.cli import main

    ck = str(runs["val"].path)
    assert main(["eval", ck, "--shared-budget", "params=1e9"]) == 0
    assert "levels chosen on the val split" in capsys.readouterr().out
    assert main(["plan", ck, "--budget", "params=1e9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected_on"] == "val"

    ck = str(runs["noval"].path)
    for argv in (["eval", ck, "--shared-budget", "params=1e9"], ["plan", ck, "--budget", "params=1e9"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("virtnet: error: tasks 'a', 'b': no validation split") and "\n" not in err
    assert main(["eval", ck, "--shared-budget", "params=1e9", "--allow-test-split"]) == 0
    assert "levels chosen on the test split (--allow-test-split" in capsys.readouterr().out
    assert main(["plan", ck, "--budget", "params=1e9", "--allow-test-split", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected_on"] == "test"
    assert main(["plan", ck, "--budget", "params=1e9", "--split", "test", "--json"]) == 0  # asked for
    assert json.loads(capsys.readouterr().out)["selected_on"] == "test"


def test_cli_shows_the_tiny_task_warning_on_one_line(tmp_path, capsys) -> None:
    import yaml

    from virtnet.cli import main

    cfg = _run_config(str(tmp_path / "r"))
    cfg["data"]["tasks"][1]["options"]["num_train"] = 4
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert err == [
        "virtnet: warning: data.tasks[1].val_fraction: the default data.val_fraction 0.1 of 4 training "
        "images leaves 0 for val and 4 for train: task 'b' gets no validation split (choices made on val "
        "will refuse it); set the task's val_fraction to decide"
    ]
