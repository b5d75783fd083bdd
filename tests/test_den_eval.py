"""``virtnet eval`` on a Deep Elastic Network: per (task, budget level) mean and max estimator FLOPs per
instance of the structures the selector chose, the selector's FLOPs and the estimator's and selector's
parameters, computed on the evaluation data through the method's ``eval_columns`` hook; the same rows from
the API and the CLI (table and --json)."""

from __future__ import annotations

import json

import pytest
import torch

from virtnet import api
from virtnet.cli import main
from virtnet.data.loader import eval_batches
from virtnet.methods import make_method
from virtnet.methods.den.model import ElasticNet
from virtnet.methods.den.report import evaluate_den
from virtnet.train.checkpoint import load_checkpoint, save_checkpoint

COLUMNS = (
    "mean_flops",
    "max_flops",
    "selector_flops",
    "mean_flops_with_selector",
    "estimator_params",
    "selector_params",
    "level_bound",
)


def config(out: str) -> dict:
    task = {"num_train": 32, "num_test": 20}
    return {
        "seed": 0,
        "output_dir": out,
        "data": {
            "tasks": [
                {
                    "name": "a",
                    "dataset": "synthetic",
                    "options": {"num_classes": 3, "size": 8, "channels": 1, "seed": 1, **task},
                },
                {
                    "name": "b",
                    "dataset": "synthetic",
                    "options": {"num_classes": 4, "size": 12, "channels": 3, "seed": 2, **task},
                },
            ]
        },
        "model": {"name": "resnet", "depth": 8, "width": 0.5, "feature_size": 8},
        "method": {
            "name": "den",
            "stages": 1,
            "estimator_epochs": 1,
            "selector_epochs": 1,
            "samples": 2,
            "budget_levels": [0.0, 0.4, 1.0],
        },
        "train": {"batch_size": 16, "lr": 0.05, "eval_every": 0, "progress": False},
        "cost": {"measure_latency": False},
    }


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A tiny DEN trained through the API, its selector's last layer then drawn at random and saved as
    ``tuned``: the instances choose structures of different costs (one short epoch leaves them alike)."""
    out = tmp_path_factory.mktemp("den_eval") / "run"
    api.train(config(str(out)), log=lambda s: None)
    ck = load_checkpoint(out / "model.json")
    state = dict(ck.model_state)
    g = torch.Generator().manual_seed(3)
    for k in [k for k in state if k.startswith("selector.fc.")]:
        state[k] = torch.randn(state[k].shape, generator=g) * 3.0
    save_checkpoint(out / "tuned", state, ck.meta)
    return api.load(out / "tuned.json")


def independent(model: ElasticNet, taskset, task: str, level: int) -> list[int]:
    """Each test instance's estimator FLOPs, from model.choose and model.structure_cost."""
    bound = model.level_bound(task, level)
    costs = []
    with torch.no_grad():
        for b in eval_batches(taskset, task, split="test", batch_size=7):
            for z in model.choose(b.x, task, bound=bound).tolist():
                costs.append(model.structure_cost(task, z))
    return costs


def test_eval_rows_carry_the_per_instance_flops_of_the_chosen_structures(loaded):
    model = loaded.model
    assert isinstance(model, ElasticNet)
    taskset = loaded.taskset()
    rows = api.evaluate_model(loaded, taskset)
    assert [(r["task"], r["level"]) for r in rows] == [(t, lv) for t in ("a", "b") for lv in (1, 2, 3)]
    spread = False
    for r in rows:
        assert set(COLUMNS) <= set(r)
        costs = independent(model, taskset, r["task"], r["level"])
        assert len(costs) == r["total"] == 20
        assert isinstance(r["max_flops"], int) and r["max_flops"] == max(costs)
        assert r["mean_flops"] == sum(costs) / len(costs)
        assert r["max_flops"] >= r["mean_flops"] >= min(costs)
        lo, hi = model.cost_range(r["task"])
        assert lo <= r["mean_flops"] and r["max_flops"] <= hi
        bound = model.level_bound(r["task"], r["level"])
        assert r["level_bound"] == bound
        if bound is not None:  # budget_kind flops: the bound is on the estimator's FLOPs per instance
            assert r["max_flops"] <= bound
        sel = model.selector_costs(r["task"])
        assert r["selector_flops"] == sel["flops"] > 0
        assert r["mean_flops_with_selector"] == r["mean_flops"] + sel["flops"]
        assert r["estimator_params"] == model.estimator_parameters()
        assert r["selector_params"] == model.selector_parameters()
        assert r["estimator_params"] + r["selector_params"] == api.total_parameters(model)
        spread = spread or len(set(costs)) > 1
    assert spread, "the test needs instances that choose structures of different costs"
    by = {(r["task"], r["level"]): r for r in rows}
    for t in ("a", "b"):  # level 1 (bound at the cheapest structure) runs the cheapest structure
        assert by[(t, 1)]["max_flops"] == by[(t, 1)]["mean_flops"] == model.cost_range(t)[0]
        assert by[(t, 1)]["mean_flops"] <= by[(t, 2)]["mean_flops"]
    # the benchmarks' evaluate_den gives the same figures at every level
    for lv in (1, 2, 3):
        for d in evaluate_den(model, taskset, level=lv):
            r = by[(d["task"], lv)]
            assert {k: d[k] for k in COLUMNS[:-1]} == {k: r[k] for k in COLUMNS[:-1]}


def test_cli_eval_prints_the_columns_in_the_table_and_json(loaded, capsys):
    api_rows = api.evaluate_model(loaded, loaded.taskset())
    assert main(["eval", str(loaded.path), "--json", "--no-latency"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "den"
    for r, a in zip(out["rows"], api_rows, strict=True):
        assert {k: r[k] for k in COLUMNS} == {k: a[k] for k in COLUMNS}
        assert r["accuracy"] == a["accuracy"]
    assert out["summary"]["estimator_params"] == api_rows[0]["estimator_params"]

    assert main(["eval", str(loaded.path), "--no-latency"]) == 0
    text = capsys.readouterr().out
    lines = [x for x in text.splitlines() if x.startswith("|")]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    method = make_method("den", {})
    for title in method.eval_titles.values():
        assert title in head, title
    body = [[c.strip() for c in x.strip("|").split("|")] for x in lines[2:]]
    assert len(body) == len(api_rows)
    col = head.index(method.eval_titles["max_flops"])
    assert [int(b[col].replace(",", "")) for b in body] == [a["max_flops"] for a in api_rows]
    col = head.index(method.eval_titles["mean_flops"])
    assert [float(b[col].replace(",", "")) for b in body] == pytest.approx(
        [a["mean_flops"] for a in api_rows], abs=0.051
    )


def test_other_methods_add_no_columns(tmp_path):
    cfg = config(str(tmp_path / "joint"))
    cfg["method"] = {"name": "joint"}
    cfg["train"]["epochs"] = 1
    run = api.train(cfg, log=lambda s: None)
    assert run.method.eval_titles == {}
    for r in run.test_rows:
        assert not set(COLUMNS) & set(r)
