"""The claims of results files (issue 15): benchmarks/_common.py's helpers and benchmarks/add_claims.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402
import add_claims  # noqa: E402
from _common import claim, floor_claims, insert_claims_markdown, text_claim, write_claims  # noqa: E402

CHECKER = ROOT.parent / "shared" / "tools" / "check_results.py"


def checker_problems(path: Path) -> list[str]:
    """../shared/tools/check_results.py's problems with ``path`` (with --require-claims)."""
    if not CHECKER.is_file():
        pytest.skip("no ../shared/tools/check_results.py")
    spec = importlib.util.spec_from_file_location("check_results", CHECKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.REQUIRE_CLAIMS = True
    return mod.check(str(path))


# ---- claim ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "value", "measured", "met"),
    [
        ("<=", 0.5, 0.5, True),
        ("<=", 0.5, 0.51, False),
        ("<", 0.5, 0.5, False),
        (">=", -2.0, -2.0, True),
        (">=", -2.0, -2.36, False),
        (">", 1.0, 1.0, False),
        ("==", 0.0, 0.0, True),
        ("==", 0.0, 0.01, False),
        ("<=", 0.5, None, False),
        (">=", 0.0, float("nan"), False),
    ],
)
def test_claim_met_is_measured_op_value(op, value, measured, met):
    c = claim("x.y", "a statement", op, value, measured)
    assert c["met"] is met
    assert c["target"] == {"op": op, "value": value}
    assert set(c) == {"id", "statement", "target", "measured", "met"}


def test_claim_rounds_float_noise_before_comparing():
    # 98.49 - 97.99 is 0.5000000000000000-something in floats: the claim compares the stored 0.5
    noisy = 98.49 - 97.99
    c = claim("gap", "s", "<=", 0.5, noisy)
    assert c["measured"] == 0.5 and c["met"] is True
    assert claim("z", "s", "==", 0.0, 86.83 - 86.83)["measured"] == 0.0
    assert claim("neg0", "s", "==", 0.0, -1e-12)["measured"] == 0.0  # no -0.0
    assert claim("i", "s", ">=", 3, 7)["measured"] == 7  # integers stay integers


def test_claim_rejects_bad_targets():
    with pytest.raises(ValueError, match="op"):
        claim("a", "s", "=<", 1.0, 1.0)
    with pytest.raises(ValueError, match="finite number"):
        claim("a", "s", "<=", float("inf"), 1.0)
    with pytest.raises(ValueError, match="finite number"):
        claim("a", "s", "<=", True, 1.0)


def test_text_claim_never_met_without_a_measurement():
    assert text_claim("t", "s", "a sentence", None, True)["met"] is False
    c = text_claim("t", "s", "a sentence", "shown", True)
    assert c["met"] is True and c["target"] == "a sentence"


def test_floor_claims_apply_to_known_datasets_and_fine_labels():
    acc = {
        ("individual", "mnist"): 99.31,
        ("individual", "fashion_mnist_fine"): 91.0,
        ("individual", "fashion_mnist_coarse"): 97.0,  # not one of the floors' label sets
        ("joint", "kmnist10k"): 97.0,
    }
    out = {c["id"]: c for c in floor_claims("b", acc)}
    assert set(out) == {
        "b.baseline_floor.individual.mnist",
        "b.baseline_floor.individual.fashion_mnist_fine",
        "b.baseline_floor.joint.kmnist10k",
    }
    assert out["b.baseline_floor.individual.mnist"]["met"] is True
    assert out["b.baseline_floor.individual.fashion_mnist_fine"]["target"] == {"op": ">=", "value": 92.0}
    assert out["b.baseline_floor.individual.fashion_mnist_fine"]["met"] is False
    assert out["b.baseline_floor.joint.kmnist10k"]["met"] is True  # 97.0 >= 97.0


# ---- markdown ---------------------------------------------------------------------------------------

MD = "# name\n\n(a note)\n\n- command: `python x.py`\n- seed: 0\n\n| method | task |\n|---|---|\n| a | b |\n"


def test_claims_table_goes_after_the_meta_lines_and_is_replaced():
    c1 = [claim("a.b", "pipe | in it", "<=", 1.0, 0.5)]
    out = insert_claims_markdown(MD, c1)
    head, rest = out.split(_common.CLAIMS_BEGIN)
    assert head == "# name\n\n(a note)\n\n- command: `python x.py`\n- seed: 0\n\n"
    table, tail = rest.split(_common.CLAIMS_END)
    assert "| `a.b` | pipe \\| in it | <= 1 | 0.5 | **yes** |" in table
    assert "1 of 1 met" in table
    assert tail == "\n\n| method | task |\n|---|---|\n| a | b |\n"
    # again, with other claims: one table, the new one; the rest as it was
    c2 = [claim("a.b", "s", "<=", 1.0, 2.0), claim("c", "s", ">=", 0, None)]
    again = insert_claims_markdown(out, c2)
    assert again.count(_common.CLAIMS_BEGIN) == 1
    assert "0 of 2 met" in again and "| – | no |" in again
    assert insert_claims_markdown(again, c2) == again
    assert insert_claims_markdown(again, c1) == out


def test_claims_table_without_meta_lines_goes_after_the_title():
    out = insert_claims_markdown("# t\n\ntext\n", [claim("a", "s", "<=", 1, 0)])
    assert out.startswith("# t\n\n" + _common.CLAIMS_BEGIN)
    assert out.endswith(_common.CLAIMS_END + "\n\ntext\n")


# ---- files ------------------------------------------------------------------------------------------


def overhead_doc(ratio: float) -> dict:
    row = {"scenario": "s", "task": "all", "level": "full", "accuracy": None, "params": 10, "flops": 5}
    return {
        "command": "python benchmarks/train_loop_overhead.py --steps 1",
        "seed": 0,
        "machine": "test",
        "benchmark": "train_loop_overhead",
        "ratio": ratio,
        "rows": [
            {"method": "plain-loop", **row, "ms_per_step": 10.0},
            {"method": "virtnet-loop", **row, "ms_per_step": 10.0 * ratio, "ratio_to_plain": ratio},
        ],
    }


def write_doc(tmp_path: Path, name: str, doc: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    meta = "\n".join(f"- {k}: {v}" for k, v in doc.items() if k != "rows")
    (tmp_path / f"{name}.md").write_text(f"# {name}\n\n{meta}\n\n| rows |\n|---|\n| 1 |\n")
    return path


def test_write_results_with_claims_passes_the_checker(tmp_path):
    doc = overhead_doc(1.2)
    claims = [claim("t.ratio", "s", "<=", 1.05, doc["ratio"])]
    stem = _common.write_results(
        "t", doc["rows"], 0, str(tmp_path / "t"), extra={"ratio": 1.2}, claims=claims
    )
    out = json.loads(stem.with_suffix(".json").read_text())
    assert out["claims"] == claims and out["claims"][0]["met"] is False
    assert list(out)[-2:] == ["claims", "rows"]
    md = stem.with_suffix(".md").read_text()
    assert md.index("- command:") < md.index("## Claims") < md.index("| method")
    assert "\n- claims:" not in md  # not repeated as a meta line
    assert checker_problems(stem.with_suffix(".json")) == []


def test_add_claims_recomputes_from_the_stored_rows(tmp_path):
    path = write_doc(tmp_path, "train_loop_overhead", overhead_doc(0.97))
    before = json.loads(path.read_text())
    assert add_claims.main([str(path)]) == 0
    after = json.loads(path.read_text())
    assert [c["id"] for c in after["claims"]] == ["train_loop_overhead.ratio"]
    assert after["claims"][0]["measured"] == 0.97 and after["claims"][0]["met"] is True
    assert {k: v for k, v in after.items() if k != "claims"} == before  # everything else as it was
    md = (tmp_path / "train_loop_overhead.md").read_text()
    assert md.startswith("# train_loop_overhead\n\n- command:")
    assert md.index("## Claims") < md.index("| rows |")
    assert checker_problems(path) == []
    # a second run gives the same files
    text = path.read_text(), md
    assert add_claims.main([str(path)]) == 0
    assert (path.read_text(), (tmp_path / "train_loop_overhead.md").read_text()) == text


def test_add_claims_dvn_joint_file_by_name(tmp_path):
    base = {"scenario": "J1", "flops": 1}

    def row(method, task, level, acc, total):
        r = {"method": method, "task": task, "level": level, "accuracy": acc, "params": 1}
        return {**r, **base, "total_params": total}

    rows = [
        row("dvn", "mnist", 1, 98.0, 510),
        row("dvn", "mnist", 2, 99.0, 510),
        row("individual", "mnist", 1, 99.4, 1000),
        row("dvn", "fashion_mnist", 1, 80.0, 510),
        row("dvn", "fashion_mnist", 2, 91.0, 510),
        row("individual", "fashion_mnist", 1, 92.0, 1000),
    ]
    path = write_doc(tmp_path, "dvn_j1", {"command": "c", "seed": 0, "benchmark": "dvn_j1", "rows": rows})
    assert add_claims.main([str(path)]) == 0
    got = {c["id"]: (c["measured"], c["met"]) for c in json.loads(path.read_text())["claims"]}
    assert got == {
        "dvn_j1.all_units_gap.mnist": (0.4, True),
        "dvn_j1.single_unit_gap.mnist": (1.4, True),
        "dvn_j1.all_units_gap.fashion_mnist": (1.0, False),
        "dvn_j1.single_unit_gap.fashion_mnist": (12.0, False),
        "dvn_j1.params_ratio": (0.51, True),
        "dvn_j1.baseline_floor.individual.mnist": (99.4, True),
        "dvn_j1.baseline_floor.individual.fashion_mnist": (92.0, True),
    }
    assert checker_problems(path) == []


def test_add_claims_den_m1_file_reads_rhos_off_its_rows(tmp_path):
    def row(method, task, acc, flops, level=1):
        return {
            "method": method,
            "scenario": "M1",
            "task": task,
            "level": level,
            "accuracy": acc,
            "params": 1,
            "flops": flops,
        }

    rows = [
        row("individual", "a", 99.0, 100),
        row("individual", "b", 97.0, 100),
        row("joint", "a", 98.5, 100),
        row("joint", "b", 96.9, 100),  # mean 97.7 against the individual 98.0: -0.3, the bound itself
        row("den-full-estimator", "a", 98.0, 100),
        row("den-full-estimator", "b", 96.0, 100),
        row("den-rho0.1", "a", 98.0, 70),
        row("den-rho0.1", "b", 97.0, 90),  # mean 97.5 (-0.5), FLOPs 80 / 100
        row("den-rand-sel-rho0.1", "a", 97.0, 80),
        row("den-rand-sel-rho0.1", "b", 96.5, 80),
    ]
    path = write_doc(tmp_path, "den_m1_x", {"command": "c", "seed": 0, "benchmark": "den_m1", "rows": rows})
    assert add_claims.main([str(path)]) == 0
    got = {c["id"]: (round(c["measured"], 6), c["met"]) for c in json.loads(path.read_text())["claims"]}
    assert got == {
        "den_m1.den-rho0.1.acc_gap_individual": (-0.5, False),
        "den_m1.den-rho0.1.flops_over_individual": (0.8, True),
        "den_m1.den-rho0.1.over_rand_sel": (0.75, False),
        "den_m1.joint.acc_gap_individual": (-0.3, True),
    }
    assert checker_problems(path) == []


def test_add_claims_leaves_unknown_benchmarks_alone(tmp_path, capsys):
    doc = {**overhead_doc(1.0), "benchmark": "no_such_benchmark"}
    path = write_doc(tmp_path, "other", doc)
    text = path.read_text()
    assert add_claims.main([str(path)]) == 0
    assert path.read_text() == text
    assert "no claims function" in capsys.readouterr().out


def test_write_claims_refuses_duplicate_ids(tmp_path):
    path = write_doc(tmp_path, "d", overhead_doc(1.0))
    with pytest.raises(ValueError, match="duplicate"):
        write_claims(path.with_suffix(""), [claim("a", "s", "<=", 1, 0), claim("a", "s", "<=", 1, 0)])


# ---- benchmarks/seeds.py ------------------------------------------------------------------------------


def test_seeds_combines_claims_by_issue_15s_rule(tmp_path):
    import seeds

    def doc(seed, gap, ratio, chosen_met, acc=90.0):
        return {
            "benchmark": "b",
            "seed": seed,
            "claims": [
                claim("b.gap", "gap (points)", ">=", -0.3, gap),
                claim("b.ratio", "ratio", "<=", 0.8, ratio),
                text_claim("b.chosen", "chosen on val", "the best val setting", 1, chosen_met),
            ],
            "rows": [
                {
                    "method": "m",
                    "scenario": "s",
                    "task": "t",
                    "level": 1,
                    "accuracy": acc,
                    "params": 7,
                    "flops": 9,
                },
                {
                    "method": "m",
                    "scenario": "s",
                    "task": "u",
                    "level": 1,
                    "accuracy": None,
                    "params": 7,
                    "flops": 9,
                },
            ],
        }

    # gaps 0.2, 0.0, -0.5: mean -0.1 meets >= -0.3; sd = 0.3606, worst + sd = -0.1394 >= -0.3 -> met
    # ratios 0.5, 0.6, 1.0: mean 0.7 meets <= 0.8; sd 0.2646, worst - sd = 0.7354 -> met = max(0.7, 0.7354)
    docs = [doc(0, 0.2, 0.5, True, 90.0), doc(1, 0.0, 0.6, True, 91.0), doc(2, -0.5, 1.0, False, 95.0)]
    rows, claims = seeds.combine(docs)
    by = {c["id"]: c for c in claims}
    assert by["b.gap"]["measured"] == pytest.approx(-0.5 + 0.360555, abs=1e-6) and by["b.gap"]["met"]
    assert by["b.gap"]["per_seed"] == [0.2, 0.0, -0.5] and by["b.gap"]["mean"] == pytest.approx(-0.1)
    assert by["b.ratio"]["measured"] == pytest.approx(1.0 - 0.264575, abs=1e-6) and by["b.ratio"]["met"]
    assert by["b.chosen"]["measured"] == "2 of 3 seeds" and not by["b.chosen"]["met"]
    # rows: the mean accuracy of each output measured at every seed (92.0 +- 2.65)
    assert rows == [
        {
            "method": "m",
            "scenario": "s",
            "task": "t",
            "level": 1,
            "params": 7,
            "flops": 9,
            "accuracy": 92.0,
            "accuracy_sd": 2.65,
            "accuracy_per_seed": [90.0, 91.0, 95.0],
        }
    ]
    # one seed far off: the mean meets the target, the worst seed misses by more than one sd -> not met
    _, claims = seeds.combine([doc(s, g, 0.5, True) for s, g in enumerate([1.0, 1.0, 1.0, 1.0, -2.0])])
    gap = next(c for c in claims if c["id"] == "b.gap")
    assert sum([1.0, 1.0, 1.0, 1.0, -2.0]) / 5 >= -0.3 and not gap["met"]


def test_seeds_joins_the_files_of_one_seed(tmp_path):
    import seeds

    def write(name, seed, claims, rows):
        p = tmp_path / f"{name}.json"
        p.write_text(
            json.dumps({"benchmark": "b", "seed": seed, "command": name, "claims": claims, "rows": rows})
        )
        return str(p)

    def row(method, acc):
        return {"method": method, "scenario": "s", "task": "t", "level": 1, "accuracy": acc}

    gap = claim("b.gap", "gap", ">=", -0.3, -0.5)
    joint = claim("b.joint", "joint gap", ">=", -0.3, -0.8)
    a = write("a", 0, [gap], [row("individual", 99.0), row("den", 98.5)])
    b = write("b", 0, [joint], [row("individual", 99.0), row("joint", 98.2)])
    doc = seeds.read_seed(f"{a}+{b}")
    assert [c["id"] for c in doc["claims"]] == ["b.gap", "b.joint"]
    assert [(r["method"], r["accuracy"]) for r in doc["rows"]] == [
        ("individual", 99.0),
        ("den", 98.5),
        ("joint", 98.2),
    ]
    assert doc["command"] == "a ; b"
    # joined with a second seed: both claims are combined over the two seeds
    c = write("c", 1, [claim("b.gap", "gap", ">=", -0.3, -0.1), claim("b.joint", "j", ">=", -0.3, -0.6)], [])
    _, claims = seeds.combine([doc, seeds.read_seed(c)])
    by = {x["id"]: x for x in claims}
    assert by["b.gap"]["per_seed"] == [-0.5, -0.1] and by["b.joint"]["per_seed"] == [-0.8, -0.6]
    # a row or claim that disagrees between the files of one seed, or another seed, is refused
    bad_row = write("d", 0, [], [row("individual", 98.0)])
    with pytest.raises(SystemExit, match=r"d.json: row .*individual.* has accuracy 98.0"):
        seeds.read_seed(f"{a}+{bad_row}")
    bad_claim = write("e", 0, [claim("b.gap", "gap", ">=", -0.3, -0.4)], [])
    with pytest.raises(SystemExit, match="e.json: claim 'b.gap' measured -0.4"):
        seeds.read_seed(f"{a}+{bad_claim}")
    with pytest.raises(SystemExit, match="c.json: benchmark 'b' seed 1 cannot join"):
        seeds.read_seed(f"{a}+{c}")


def test_last_quarter_gain_is_the_best_of_the_last_quarter_minus_the_best_before():
    # 8 epochs: the last quarter is the last 2; best before 90.0, best after 90.5
    assert _common.last_quarter_gain([50, 80, 90, 85, 88, 89, 90.5, 90.25]) == pytest.approx(0.5)
    # fewer than 4 epochs: the last quarter is the last epoch
    assert _common.last_quarter_gain([70, 80, 79]) == pytest.approx(-1.0)
    assert _common.last_quarter_gain([70]) is None


def test_eval_curves_and_converged_claims_read_the_history():
    class Run:
        summary = {
            "history": [
                {"event": "eval", "rows": [{"task": "a", "level": 1, "accuracy": 80.0}]},
                {"event": "train", "loss": 1.0},
                {"event": "eval", "rows": [{"task": "a", "level": 1, "accuracy": 85.0}]},
            ]
        }

    assert _common.eval_curves(Run()) == {("a", 1): [80.0, 85.0]}
    rows = [
        {"method": "individual", "task": "a", "last_quarter_gain": 0.1},
        {"method": "dvn", "task": "a", "last_quarter_gain": 3.0},
        {"method": "individual", "task": "b"},
    ]
    got = _common.converged_claims("x", rows, ("individual",))
    assert [(c["id"], c["measured"], c["met"]) for c in got] == [("x.converged.individual.a", 0.1, True)]
    assert [c["met"] for c in _common.converged_claims("x", rows)] == [True, False]
