"""Fully-adaptive feature sharing (``branching``): widening, optimizer state, affinity, clustering and cost,
SOMP, checkpoints of widened models, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from virtnet import api
from virtnet.data.core import Batch
from virtnet.errors import CheckpointError, ConfigError
from virtnet.methods import make_method
from virtnet.methods.base import Phase, TrainContext
from virtnet.methods.branching.affinity import AffinityEstimator, branch_affinity, task_margins
from virtnet.methods.branching.clustering import (
    branching_cost,
    choose_branches,
    separation_cost,
    spectral_groups,
)
from virtnet.methods.branching.model import BranchingNet, layer_plan
from virtnet.methods.branching.somp import reconstruction_error, somp_init, somp_select
from virtnet.protocol import TaskSpec

SPECS = [TaskSpec("a", 1, 8, 3), TaskSpec("b", 3, 8, 2)]


def _model(**kw) -> BranchingNet:
    torch.manual_seed(0)
    opts = {"depth": 11, "omega": 8, "feature_size": 8, "attribute_tasks": ["a", "b"], **kw}
    return BranchingNet(SPECS, **opts)


def _perturb_bn(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so eval-mode outputs depend on every batch norm."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _x(spec: TaskSpec, n: int = 4, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, spec.in_channels, spec.input_size, spec.input_size, generator=g).to(dtype)


# ---- the thin model ----------------------------------------------------------------------------------
def test_thin_widths_are_min_omega_vgg_and_two_omega_for_fc():
    stem, plan = layer_plan(16, 100, 2, 32)
    assert stem == 64  # omega above the VGG width: the VGG width
    assert [d["out"] for d in plan if d["kind"] == "conv"] == [64, 100, 100, 100, 100, 100, 100] + [100] * 5
    assert [d["out"] for d in plan if d["kind"] == "fc"] == [200, 200]
    assert [d["name"] for d in plan][-3:] == ["conv5_3", "fc6", "fc7"]
    stem, plan = layer_plan(16, 32, 2, 28)
    assert stem == 32 and all(d["out"] == 32 for d in plan if d["kind"] == "conv")
    assert sum(d["pool"] for d in plan) == 4  # 28 -> 14 -> 7 -> 3 -> 1, the fifth pool skipped


def test_outputs_one_sigmoid_per_attribute_and_multiclass_tasks():
    model = BranchingNet(SPECS, depth=11, omega=4, feature_size=8, attribute_tasks=["a"])
    assert model.branch_task_names() == ["a/0", "a/1", "a/2", "b"]
    assert model(_x(SPECS[0]), "a").shape == (4, 3)
    assert model(_x(SPECS[1]), "b").shape == (4, 2)


# ---- widening ------------------------------------------------------------------------------------------
def _widen_all(model: BranchingNet) -> list[dict[str, str]]:
    """Two rounds: heads into {a/0, a/1} {a/2, b/0} {b/1}, then those into two groups."""
    out = [model.widen([0, 0, 1, 1, 2])]
    out.append(model.widen([0, 1, 1]))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_widening_preserves_outputs(dtype):
    model = _model()
    _perturb_bn(model)
    model = model.to(dtype).eval()
    before = {s.name: model(_x(s, dtype=dtype), s.name) for s in SPECS}
    _widen_all(model)
    assert [len(layer) for layer in model.tree][-2:] == [2, 3]
    for s in SPECS:
        after = model(_x(s, dtype=dtype), s.name)
        if dtype == torch.float64:
            assert torch.equal(after, before[s.name])
        else:
            torch.testing.assert_close(after, before[s.name], rtol=0, atol=1e-6)


def test_widened_branches_are_copies_that_then_train_apart():
    model = _model()
    state_from = model.widen([0, 0, 0, 1, 1])
    top = model.num_layers - 1
    assert len(model.trunk[top]) == 2
    a, b = model.trunk[top][0], model.trunk[top][1]
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb) and pa is not pb
        assert state_from[f"trunk.{top}.1.{nb}"] == f"trunk.{top}.0.{na}"
    assert model.tree[top] == [(0, 1, 2), (3, 4)]
    assert model.active == top and not model.done


def test_one_group_stops_and_the_bottom_ends_widening():
    model = _model()
    assert model.widen([0] * 5) == {} and model.done
    model = _model()
    model.widen(list(range(5)))
    while model.can_widen():
        model.widen(list(range(len(model.branches_at(model.active)))))
    assert model.done and model.active == 0
    with pytest.raises(ConfigError, match="cannot be widened"):
        model.widen([0])


def _batches(n: int = 8, seed: int = 0) -> dict[str, Batch]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in SPECS:
        x = torch.randn(n, s.in_channels, 8, 8, generator=g)
        y = (torch.rand(n, s.num_outputs, generator=g) > 0.5).float()
        out[s.name] = Batch(s.name, x, y, torch.ones_like(y, dtype=torch.bool))
    return out


def test_optimizer_state_after_a_rebuild_matches_the_origin_branch():
    """The loop's rebuild (build_optimizers + carry_state, what Trainer._rebuild runs) after a round."""
    from virtnet.train.config import TrainConfig
    from virtnet.train.step import build_optimizers, carry_state

    method = make_method(
        "branching", {"depth": 11, "omega": 8, "attribute_tasks": ["a", "b"], "round_steps": 2}
    )
    model = _model()
    phase = Phase("branching", ["a", "b"], 0)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9)
    opts = build_optimizers(method, model, phase, cfg)
    ctx = None
    for step in range(2):
        out = method.training_step(model, _batches(seed=step), phase)
        for po in opts.values():
            po.opt.zero_grad()
        out["loss"].backward()
        for po in opts.values():
            po.opt.step()
        names = {id(p): n for n, p in model.named_parameters()}
        ctx = TrainContext(phase, 0, step, step + 1, {k: po.opt for k, po in opts.items()})
        method.on_step_end(model, phase, ctx)
    assert ctx is not None and ctx.rebuild_request, "the round should have widened the top layer"
    new = build_optimizers(method, model, phase, cfg)
    carry_state(opts, new, model, ctx.rebuild_request, names)
    params = dict(model.named_parameters())
    state = new["main"].opt.state
    for new_name, old_name in ctx.rebuild_request.items():
        got, want = state[params[new_name]], state[params[old_name]]
        assert torch.equal(got["momentum_buffer"], want["momentum_buffer"])
        assert got["momentum_buffer"] is not want["momentum_buffer"]
    # every parameter that existed before kept its own state
    assert all(params[n] in state for n in names.values() if params[n].grad is not None)


# ---- affinity ------------------------------------------------------------------------------------------
def test_affinity_is_symmetric_with_ones_on_the_diagonal():
    est = AffinityEstimator(5, decay=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        est.decay_step()
        known = torch.rand(16, 3, generator=g) > 0.3
        est.update([0, 1, 2], torch.rand(16, 3, generator=g), known)
        est.update([3, 4], torch.rand(12, 2, generator=g), torch.ones(12, 2, dtype=torch.bool))
    a = est.matrix()
    assert torch.equal(a, a.T)
    assert torch.equal(torch.diagonal(a), torch.ones(5, dtype=torch.float64))
    assert bool(((a >= 0) & (a <= 1)).all())
    q = est.difficult_rate()
    # tasks never seen on the same examples: the independence value of their marginals
    want = q[0] * q[3] + (1 - q[0]) * (1 - q[3])
    assert float(a[0, 3]) == pytest.approx(float(want))
    zero = est.matrix(unpaired=0.0)  # unpaired_affinity: 0
    assert float(zero[0, 3]) == 0.0 and torch.equal(zero[:3, :3], a[:3, :3])


def test_affinity_eq6_on_a_hand_made_batch():
    est = AffinityEstimator(2, decay=0.5)
    est.decay_step()
    margins = torch.tensor([[0.9, 0.8], [0.1, 0.7], [0.2, 0.1], [0.0, 0.0]], dtype=torch.float64)
    est.update([0, 1], margins, torch.ones(4, 2, dtype=torch.bool))
    # E{m} = 0.3 and 0.4; difficult: task 0 {0}, task 1 {0, 1}; concurrently easy or difficult: 3 of 4
    assert float(est.matrix()[0, 1]) == pytest.approx(0.75)


def test_affinity_decays_old_batches():
    est = AffinityEstimator(2, decay=0.5)
    same = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    diff = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ones = torch.ones(2, 2, dtype=torch.bool)
    est.decay_step()
    est.update([0, 1], same, ones)  # agreement 1
    est.decay_step()
    est.update([0, 1], diff, ones)  # agreement 0
    assert float(est.matrix()[0, 1]) == pytest.approx((0.5 * 1 + 1 * 0) / 1.5)


def test_margins_and_a_batch_without_labels():
    logits = torch.zeros(3, 2)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    m, known = task_margins(logits, y, torch.zeros(3, 2, dtype=torch.bool))
    assert torch.allclose(m, torch.full((3, 2), 0.5, dtype=torch.float64)) and not known.any()
    est = AffinityEstimator(2)
    est.decay_step()
    est.update([0, 1], m, known)  # nothing labelled: nothing learned, no NaN
    assert torch.isfinite(est.matrix()).all() and float(est.margin_weight.sum()) == 0
    m, _ = task_margins(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), None)
    assert float(m) == pytest.approx(1 - torch.softmax(torch.tensor([2.0, 0.0]), 0)[0].item())


def test_branch_affinity_eqs_7_8():
    a = torch.tensor([[1.0, 0.9, 0.3], [0.9, 1.0, 0.5], [0.3, 0.5, 1.0]], dtype=torch.float64)
    assert torch.equal(branch_affinity(a, [[0], [1], [2]]), a)
    ab = branch_affinity(a, [[0, 1], [2]])
    # k = {0, 1}, l = {2}: mean_i min_j = (0.3 + 0.5) / 2; mean_j min_i = 0.3
    assert float(ab[0, 1]) == pytest.approx((0.4 + 0.3) / 2) and float(ab[1, 0]) == float(ab[0, 1])


def _estimate(patterns: list[int], steps: int = 30, n: int = 64) -> torch.Tensor:
    """Affinity of tasks whose difficulty follows ``patterns[i]`` (tasks of one pattern: the same margins)."""
    g = torch.Generator().manual_seed(0)
    est = AffinityEstimator(len(patterns))
    for _ in range(steps):
        est.decay_step()
        base = torch.rand(n, max(patterns) + 1, generator=g)
        m = base[:, patterns] + 0.01 * torch.rand(n, len(patterns), generator=g)
        est.update(range(len(patterns)), m.clamp(0, 1), torch.ones(n, len(patterns), dtype=torch.bool))
    return est.matrix()


def test_identical_tasks_do_not_branch():
    a = _estimate([0, 0, 0, 0])
    choice = choose_branches(a, alpha=2.0, unit_cost=0.1, pools_above=0)
    assert choice.num_branches == 1


def test_two_clearly_different_groups_branch_apart():
    a = _estimate([0, 0, 0, 1, 1, 1])
    choice = choose_branches(a, alpha=1.0, unit_cost=0.1, pools_above=0)
    assert choice.labels == [0, 0, 0, 1, 1, 1]
    # a much higher unit cost (or a branch below several pooling layers) keeps them together
    assert choose_branches(a, alpha=1.0, unit_cost=0.1, pools_above=4).num_branches == 1


# ---- cost ----------------------------------------------------------------------------------------------
def test_cost_terms_on_hand_made_numbers():
    assert branching_cost(1, 3, 0.5) == 0.0
    assert branching_cost(3, 2, 0.5) == 2 * 0.5 * 4
    a = torch.tensor(
        [[1.0, 0.8, 0.2, 0.1], [0.8, 1.0, 0.3, 0.2], [0.2, 0.3, 1.0, 0.6], [0.1, 0.2, 0.6, 1.0]],
        dtype=torch.float64,
    )
    # one group: 1 - mean of row minima (0.1, 0.2, 0.2, 0.1) = 0.85
    assert separation_cost(a, [0, 0, 0, 0]) == pytest.approx(0.85)
    # {0, 1}: 1 - 0.8; {2, 3}: 1 - 0.6; averaged over the two groups
    assert separation_cost(a, [0, 0, 1, 1]) == pytest.approx((0.2 + 0.4) / 2)
    assert separation_cost(a, [0, 1, 2, 3]) == pytest.approx(0.0)
    choice = choose_branches(a, alpha=1.0, unit_cost=0.1, pools_above=0)
    losses = {c["d"]: c["loss"] for c in choice.candidates}
    assert losses[1] == pytest.approx(0.85) and losses[2] == pytest.approx(0.1 + 0.3)
    assert losses[4] == pytest.approx(0.3)
    assert choice.labels == [0, 0, 1, 1] or losses[4] < losses[2]
    assert choose_branches(a, alpha=1.0, unit_cost=0.1, pools_above=0).num_branches == (
        min(losses, key=lambda d: (losses[d], d))
    )
    assert spectral_groups(a, 2) == [0, 0, 1, 1]


# ---- SOMP ----------------------------------------------------------------------------------------------
def test_somp_recovers_the_rows_a_matrix_is_built_from():
    g = torch.Generator().manual_seed(0)
    base = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))[0].T  # 4 orthonormal rows
    # each base row three times, scaled: the 4 picks must be one row of each direction
    rows = torch.cat([base * s for s in (1.0, -2.0, 0.5)])  # (12, 20)
    chosen = somp_select(rows, 4)
    assert sorted(i % 4 for i in chosen) == [0, 1, 2, 3]
    assert reconstruction_error(rows, chosen) < 1e-12
    # a rank-4 matrix that contains 4 of its generating rows: reconstructed exactly
    w = torch.cat([base, torch.randn(8, 4, generator=g, dtype=base.dtype) @ base])
    chosen = somp_select(w, 4)
    assert reconstruction_error(w, chosen) < 1e-10
    assert somp_select(w, 100) == list(range(12))


def test_somp_init_from_a_wider_vgg():
    from virtnet.backbones.registry import BackboneConfig, build_multitask

    torch.manual_seed(0)
    cfg = BackboneConfig(name="vgg", depth=11, hidden=[32, 32], feature_size=8)
    wide = build_multitask(cfg, SPECS)
    _perturb_bn(wide)
    thin = _model()
    selected = somp_init(thin, wide.state_dict(), "wide")
    sd = wide.state_dict()
    rows = selected["conv1_1"]
    assert torch.equal(thin.stems["a"].conv.weight, sd["stems.a.conv.weight"][rows])
    assert torch.equal(thin.stems["b"].bn.running_var, sd["stems.b.bn.running_var"][rows])
    first = thin.trunk[0][0]
    conv = next(m for m in first.modules() if isinstance(m, torch.nn.Conv2d))
    want = sd["trunk.blocks.1.0.weight"][selected["conv2_1"]][:, rows]  # rows, then the truncated columns
    assert torch.equal(conv.weight, want)
    head = sd["heads.b.weight"][1:2][:, selected["fc7"]]
    assert torch.equal(thin.heads[4].weight, head)  # b/1: the second output of b's head
    with pytest.raises(ConfigError, match="omega"):
        somp_init(_model(omega=64), wide.state_dict(), "wide")  # fc widths 128 > 32
    with pytest.raises(CheckpointError, match="trunk layers"):
        somp_init(_model(fc_layers=1), wide.state_dict(), "wide")


# ---- through the loop: checkpoints of a widened model ------------------------------------------------
def _task(name: str, seed: int, attrs: dict, channels: int = 1) -> dict:
    opts = {"num_classes": 6, "size": 8, "channels": channels, "num_train": 48, "num_test": 16, "seed": seed}
    return {"name": name, "dataset": "synthetic", "options": opts, "attributes": attrs}


def _config(out: str, **method) -> dict:
    return {
        "seed": 0,
        "output_dir": out,
        "data": {
            "tasks": [
                _task("a", 0, {"x": [0, 1, 2], "y": [0, 2, 4], "z": [1]}),
                _task("b", 1, {"u": [0, 1], "v": [3, 4, 5]}, channels=3),
            ]
        },
        "model": {"name": "vgg"},
        "method": {
            "name": "branching",
            "depth": 11,
            "omega": 4,
            "round_steps": 2,
            "attribute_tasks": ["a", "b"],
            "alpha": 2.0,
            "unit_cost": 0.01,
            **method,
        },
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "eval_every": 0},
        "cost": {"measure_latency": False},
    }


@pytest.fixture(scope="module")
def widened(tmp_path_factory):
    out = tmp_path_factory.mktemp("branching")
    return api.train(_config(str(out)), log=lambda s: None)


def test_a_widened_model_saves_and_loads_with_equal_outputs(widened, monkeypatch):
    run = widened
    assert run.model.rounds, "the run should have widened"
    assert max(len(layer) for layer in run.model.tree) > 1
    cls = type(run.method)
    monkeypatch.setattr(cls, "on_phase_start", lambda *a, **k: pytest.fail("phase replayed"))
    loaded = api.load(run.out_dir / "model.json")
    assert loaded.model.tree == run.model.tree
    run.model.eval()
    for s in run.model.specs_list():
        x = _x(s)
        with torch.no_grad():
            assert torch.equal(loaded.model(x, s.name), run.model(x, s.name))


def test_a_branched_task_exports_to_a_plain_network(widened, tmp_path):
    run = widened
    run.model.eval()
    for s in run.model.specs_list():
        net = run.method.export(run.model, s.name)
        x = _x(s)
        with torch.no_grad():
            want = run.model(x, s.name)
            torch.testing.assert_close(net(x), want, rtol=1e-6, atol=1e-6)
        program = torch.export.export(net, (x,))
        torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
        assert all(n.startswith(("stem.", "trunk.", "head.")) for n, _ in net.named_parameters())


def test_a_tree_that_does_not_match_the_tensors_is_refused(widened, tmp_path):
    run = widened
    meta = json.loads((run.out_dir / "model.json").read_text())
    tree = meta["structure"]["tree"]
    top = len(tree) - 1
    assert len(tree[top]) > 1
    # same number of branches per layer (same tensor shapes), tasks swapped between two branches
    first, second = tree[top][0], tree[top][1]
    swapped = [[second[0]] + first[1:], [first[0]] + second[1:]] + tree[top][2:]
    bad = json.loads(json.dumps(meta))
    bad["structure"]["tree"][top] = [sorted(b) for b in swapped]
    for l in range(top + 1, len(tree)):
        bad["structure"]["tree"][l] = tree[l]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(bad))
    (tmp_path / "model.safetensors").write_bytes((run.out_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError):
        api.load(path)
    bad["structure"]["tree"] = tree[:-1]
    path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError):
        api.load(path)


def test_rounds_are_logged_with_d_and_cost_terms(widened):
    r = widened.model.rounds[0]
    assert r["active_layer"] == "heads" and r["layer"] == "fc7" and r["pools_above"] == 0
    assert r["d"] == len(set(r["groups"]))
    for c in r["candidates"]:
        assert c["loss"] == pytest.approx(c["complexity"] + r["alpha"] * c["separation"])
    text = widened.method.summary(widened.model, [])["tree"]
    assert "fc7" in text and "round 1" in text


def test_the_tree_and_affinity_figures(widened, tmp_path):
    from virtnet.methods.branching.inspect import draw_tree, plot_affinity

    s = widened.model.structure()
    assert draw_tree(s, tmp_path / "tree.png").stat().st_size > 0
    assert (
        plot_affinity(s["rounds"][0]["affinity"], tmp_path / "aff.png", s["branch_tasks"]).stat().st_size > 0
    )


def test_thin_baseline_never_widens(tmp_path):
    run = api.train(_config(str(tmp_path), max_rounds=0), log=lambda s: None)
    assert not run.model.rounds and all(len(layer) == 1 for layer in run.model.tree)


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_options_are_refused():
    for options in ({"alpha": 0}, {"alpha": -1.0}, {"omega": 0}, {"depth": 15}, {"unit_cost": 0}):
        with pytest.raises(ConfigError):
            make_method("branching", options)
    with pytest.raises(ConfigError, match="attribute_tasks"):
        BranchingNet(SPECS, depth=11, omega=4, feature_size=8, attribute_tasks=["nope"])


def test_a_batch_with_no_labels_for_a_task_is_masked_without_nan():
    method = make_method("branching", {"depth": 11, "omega": 4, "attribute_tasks": ["a", "b"]})
    model = _model(omega=4)
    batches = _batches()
    b = batches["a"]
    batches["a"] = Batch("a", b.x, b.y, torch.zeros_like(b.mask))
    out = method.training_step(model, batches, Phase("branching", ["a", "b"], 0))
    assert torch.isfinite(out["loss"]) and float(out["loss/a"]) == 0.0
    out["loss"].backward()
    assert torch.isfinite(model.affinity.matrix()).all()


class _Stop(Exception):
    pass


def test_a_run_interrupted_after_a_widening_resumes_to_the_same_weights(widened, tmp_path, monkeypatch):
    """The loop applies the saved structure (the widened tree) before loading the tensors on resume."""
    cfg = _config(str(tmp_path / "cut"))
    cfg["train"] = {**cfg["train"], "checkpoint_every_steps": 1}
    cls = type(widened.method)
    step = cls.training_step
    calls = {"n": 0}

    def stopping(self, model, batches, phase):
        calls["n"] += 1
        if calls["n"] == 6:  # after the widenings at steps 2 and 4
            raise _Stop
        return step(self, model, batches, phase)

    monkeypatch.setattr(cls, "training_step", stopping)
    with pytest.raises(_Stop):
        api.train(cfg, log=lambda s: None)
    monkeypatch.setattr(cls, "training_step", step)
    saved = json.loads((tmp_path / "cut" / "checkpoints" / "last.json").read_text())
    assert saved["structure"]["rounds"], "the interrupted run should have widened before stopping"
    resumed = api.train(cfg, resume=True, log=lambda s: None)
    assert resumed.model.tree == widened.model.tree
    want, got = widened.model.state_dict(), resumed.model.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
