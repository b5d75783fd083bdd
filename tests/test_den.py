"""Deep Elastic Networks: eq. 3 over an enumerable structure space, REINFORCE (eq. 7) against the exact
gradient, masked / grouped / sliced paths, skipped blocks, costs, budgets, rho, training through the loop,
bad input."""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from virtnet import api
from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import BackboneConfig
from virtnet.cost import count_flops
from virtnet.errors import BudgetError, CheckpointError, ConfigError, TaskError
from virtnet.methods import make_method
from virtnet.methods.den import (
    DENConfig,
    greedy,
    initial_structures,
    log_probs,
    reinforce_loss,
    sample,
    structure_log_prob,
    top_k,
)
from virtnet.methods.den.blocks import ElasticBlock, LevelNorm
from virtnet.methods.den.report import evaluate_den, level_distribution, random_chooser
from virtnet.nn import Route

RESNET = BackboneConfig(name="resnet", depth=8, width=0.5, feature_size=8)
BACKBONES = {
    "resnet": RESNET,
    "wrn": BackboneConfig(name="wrn", depth=10, widen_factor=1, width=0.5, feature_size=8),
    "vgg": BackboneConfig(name="vgg", depth=11, width=0.125, feature_size=16),
    "simpleconvnet": BackboneConfig(name="simpleconvnet", width=0.5, feature_size=16),
}
SPECS = [TaskSpec("a", 1, 8, 3), TaskSpec("b", 3, 12, 4)]


def build(backbone=RESNET, specs=SPECS, seed=0, **options):
    method = make_method("den", options)
    torch.manual_seed(seed)
    return method, method.build(specs, backbone)


def moved_bn(model, specs=SPECS, steps=3):
    """Move every batch norm's statistics off their defaults, every level seen."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            for s in specs:
                x = torch.randn(16, s.in_channels, s.input_size, s.input_size)
                z = torch.randint(0, model.num_levels, (16, model.num_blocks))
                model(x, s.name, model.instance_route(s.name, z, masked=True))
    model.eval()


def inputs(spec, n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec.in_channels, spec.input_size, spec.input_size, generator=g)


# ---- eq. 3 and decodings --------------------------------------------------------------------------------
def test_structure_probabilities_sum_to_one_over_every_structure():
    logits = torch.randn(4, 3, 3, requires_grad=True)
    logp = log_probs(logits)
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))  # 27 structures
    lp = structure_log_prob(logp, every[None].expand(4, -1, -1))  # (4, 27)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(4))
    best = lp.argmax(1)
    assert torch.equal(every[best], greedy(logp))
    z, v = top_k(logp, 5)
    want = lp.topk(5, dim=1)
    torch.testing.assert_close(v, want.values)
    assert torch.equal(z[:, 0], greedy(logp))


def test_initial_distribution_is_eq8():
    torch.manual_seed(0)
    n, h, tau = 2, 3, 0.75
    z = initial_structures(60000, n, h, tau, torch.device("cpu"))
    full = (z == h - 1).all(1).float().mean().item()
    assert abs(full - (tau + (1 - tau) / h**n)) < 0.01  # p(z*) = tau + (1 - tau) / h^n
    other = ((z[:, 0] == 0) & (z[:, 1] == 1)).float().mean().item()
    assert abs(other - (1 - tau) / h**n) < 0.005


@pytest.mark.parametrize("epsilon,baseline", [(0.0, "none"), (0.0, "self_critical"), (0.3, "self_critical")])
def test_reinforce_mean_matches_the_exact_gradient(epsilon, baseline):
    """Eq. 7 on an enumerable case: n = 2 blocks, h = 3 levels (9 structures), fixed rewards. The
    estimate from 40,000 samples of the epsilon-mixture q, log q taken under q, is unbiased for
    grad E_q[R] = (1 - eps) grad E_P[R]; tolerance 0.02 (about 5 standard errors)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 3, requires_grad=True)
    reward = torch.tensor([[0.3, 1.2, -0.4], [0.8, 0.0, 2.0], [1.5, -1.0, 0.6]])  # R(l1, l2)
    every = torch.tensor(list(itertools.product(range(3), repeat=2)))
    exact_j = (
        structure_log_prob(log_probs(logits), every[None]).exp()[0] * reward[every[:, 0], every[:, 1]]
    ).sum()
    (exact,) = torch.autograd.grad(exact_j, logits)
    g = torch.Generator().manual_seed(1)
    logp = log_probs(logits)
    z, logq = sample(logp, 40000, epsilon, generator=g)
    r = reward[z[0, :, 0], z[0, :, 1]][None]
    b = None
    if baseline == "self_critical":
        zg = greedy(logp.detach())
        b = reward[zg[:, 0], zg[:, 1]]
    (est,) = torch.autograd.grad(reinforce_loss(logq, r, b), logits)
    torch.testing.assert_close(est, (1 - epsilon) * exact, atol=0.02, rtol=0)


# ---- the two paths and the sliced network ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(BACKBONES))
def test_masked_grouped_and_sliced_paths_agree(name):
    method, model = build(BACKBONES[name])
    moved_bn(model)
    for spec in SPECS:
        x = inputs(spec)
        z = torch.randint(
            0, model.num_levels, (9, model.num_blocks), generator=torch.Generator().manual_seed(3)
        )
        with torch.no_grad():
            masked = model(x, spec.name, model.instance_route(spec.name, z, masked=True))
            grouped = model(x, spec.name, model.instance_route(spec.name, z))
            torch.testing.assert_close(masked, grouped, rtol=1e-5, atol=1e-5)
            for i in range(3):  # batch 1: the structure as a plain sliced network
                net = method.export_structure(model, spec.name, z[i])
                torch.testing.assert_close(net(x[i : i + 1]), grouped[i : i + 1], rtol=1e-5, atol=1e-5)
                static = model(x[i : i + 1], spec.name, model.structure_route(spec.name, z[i]))
                torch.testing.assert_close(static, grouped[i : i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "vgg"])
def test_structure_costs_are_the_exported_networks(name):
    method, model = build(BACKBONES[name])
    g = torch.Generator().manual_seed(0)
    for spec in SPECS:
        for _ in range(4):
            z = torch.randint(0, model.num_levels, (model.num_blocks,), generator=g)
            net = method.export_structure(model, spec.name, z)
            # a plain network: the backbone's own layers, no elastic block nor private-norm container
            assert not [m for m in net.modules() if isinstance(m, (ElasticBlock, LevelNorm))]
            assert count_flops(net, spec.input_shape) == model.structure_cost(spec.name, z)
            assert sum(p.numel() for p in net.parameters()) == model.structure_cost(spec.name, z, "params")
            used = sum(int(m.sum()) for m in model.structure_usage(spec.name, z.tolist()).values())
            assert used == model.structure_cost(spec.name, z, "params")


def test_a_skipped_block_is_not_executed():
    method, model = build()
    model.eval()
    spec = SPECS[0]
    x = inputs(spec, n=8)
    flops = model.block_costs()["flops"]
    full = torch.full((8, model.num_blocks), model.num_levels - 1)
    skip = full.clone()
    skip[:, 0] = 0  # block 0 (identity shortcut) skipped for every instance
    counts = []
    for z in (full, skip):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x, spec.name, model.instance_route(spec.name, z))
        counts.append(counter.get_total_flops())
    assert flops[0][0] == 0 and flops[1][0] > 0  # block 1's projection shortcut runs at level 0
    assert counts[0] - counts[1] == 8 * flops[0][-1]
    # exported: the skipped block is an identity, no convolution in it
    net = method.export_structure(model, spec.name, skip[0])
    assert isinstance(net.trunk.blocks[0], torch.nn.Identity)


def test_private_norm_per_level_and_shared_inner_norm():
    _, model = build()
    blk = model.blocks()[1]
    assert sorted(blk.bn2.norms) == ["1", "2"]  # level 0 has no channel, no norm
    assert isinstance(blk.bn1, torch.nn.BatchNorm2d)  # inner channels: one shared (sliced) norm
    _, vgg = build(BACKBONES["vgg"])
    assert vgg.blocks()[0].widths[0] > 0  # plain blocks keep one group at the lowest level


def test_inference_never_uses_batch_statistics():
    _, model = build()
    moved_bn(model)
    spec = SPECS[1]
    x = inputs(spec, n=6)
    with torch.no_grad():
        alone = torch.cat([model(x[i : i + 1], spec.name) for i in range(6)])
        batch = model(x, spec.name)
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("part", ["estimator", "selector"])
def test_every_task_goes_through_the_shared_norms_in_one_forward(part):
    """A training step runs the trunk (estimator stage) or the selector's body (selector stage) once over
    every task's batch: its first shared batch norm sees all ``B_a + B_b`` instances in one call, and its
    running mean moves by momentum x that mixture's mean (as at inference, where one set of running
    statistics serves every task). One forward per task would train each task on its own statistics."""
    from virtnet.data.core import Batch

    method, model = build()
    sizes = {"a": 5, "b": 7}
    batches = {
        s.name: Batch(s.name, inputs(s, n=sizes[s.name], seed=i), torch.arange(sizes[s.name]) % s.num_outputs)
        for i, s in enumerate(SPECS)
    }
    phase = method._phase(["a", "b"], 0 if part == "estimator" else 3)  # estimator-1 / selector-2
    model.density_table()  # the cost tables (an eval-mode probe of the trunk, cached) exist already
    model.train()
    if part == "estimator":
        bn = model.blocks()[0].bn1  # the shared norm over the first block's inner channels
    else:
        bn = next(m for m in model.selector.body if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    before = bn.running_mean.clone()
    try:
        method.training_step(model, batches, phase)
    finally:
        hook.remove()
    assert [t.shape[0] for t in seen] == [12]
    mean = seen[0].double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(
        bn.running_mean.double(), 0.9 * before.double() + 0.1 * mean, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("task_bn", ["stats", "private"])
def test_task_bn_gives_each_task_its_own_norms_on_tied_weights(task_bn, tmp_path):
    """``task_bn``: task b runs its own trunk whose convolutions are task a's tensors (and with ``stats``
    its norms' scales and shifts too); its norms' statistics are its own and see b's batch only; the
    parameters counted once; saved and loaded (safetensors, each tensor once) to equal outputs; masked,
    grouped and exported paths still agree."""
    from virtnet.data.core import Batch
    from virtnet.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint

    method, model = build(task_bn=task_bn)
    _, plain = build()
    ta, tb = model.trunk_of("a"), model.trunk_of("b")
    assert ta is model.trunk and tb is not ta
    ba, bb = model.blocks()[0], tb.blocks[0]
    assert ba.conv1.weight is bb.conv1.weight and ba.conv2.weight is bb.conv2.weight
    assert (ba.bn1.weight is bb.bn1.weight) == (task_bn == "stats")
    assert ba.bn1.running_mean is not bb.bn1.running_mean
    norm_params = sum(
        p.numel() for m in ta.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()
    )
    extra = 0 if task_bn == "stats" else norm_params
    assert model.estimator_parameters() == plain.estimator_parameters() + extra
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + extra
    # an estimator step: each task's first inner norm sees that task's batch alone
    sizes = {"a": 5, "b": 7}
    batches = {
        s.name: Batch(s.name, inputs(s, n=sizes[s.name], seed=i), torch.arange(sizes[s.name]) % s.num_outputs)
        for i, s in enumerate(SPECS)
    }
    model.density_table()
    model.train()
    seen: dict[str, list[int]] = {"a": [], "b": []}
    hooks = [
        bn.register_forward_pre_hook(lambda m, args, t=t: seen[t].append(args[0].shape[0]))
        for t, bn in (("a", ba.bn1), ("b", bb.bn1))
    ]
    try:
        out = method.training_step(model, batches, method._phase(["a", "b"], 0))
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"a": [5], "b": [7]}
    out["loss"].backward()
    assert ba.conv1.weight.grad is not None
    # saved once per tensor, loaded into a fresh model: identical outputs
    moved_bn(model)
    state = model.state_dict()
    assert not any(k.startswith("task_trunks.") and ".conv" in k for k in state)
    assert any(k.startswith("task_trunks.b.") and "running_mean" in k for k in state)
    save_checkpoint(tmp_path / "m", state, {"kind": "test"})
    _, fresh = build(task_bn=task_bn, seed=5)
    load_model_state(fresh, load_checkpoint(tmp_path / "m").model_state)
    fresh.eval()
    assert fresh.trunk_of("b").blocks[0].conv1.weight is fresh.blocks()[0].conv1.weight
    z = torch.randint(0, model.num_levels, (9, model.num_blocks), generator=torch.Generator().manual_seed(3))
    for spec in SPECS:
        x = inputs(spec)
        with torch.no_grad():
            masked = model(x, spec.name, model.instance_route(spec.name, z, masked=True))
            grouped = model(x, spec.name, model.instance_route(spec.name, z))
            assert torch.equal(fresh(x, spec.name, fresh.instance_route(spec.name, z)), grouped)
            torch.testing.assert_close(masked, grouped, rtol=1e-5, atol=1e-5)
            net = method.export_structure(model, spec.name, z[0])
            torch.testing.assert_close(net(x[:1]), grouped[:1], rtol=1e-5, atol=1e-5)
    # task b's statistics are its own: the same input through a and b differs (their norms differ)
    xb = inputs(SPECS[1])
    with torch.no_grad():
        f = model.stem("b")(xb)
        assert not torch.allclose(ta(f), tb(f))


@pytest.mark.parametrize("stage", [1, 2])
def test_train_full_adds_the_full_structures_loss_after_the_first_stage(stage):
    """``train_full``: an estimator step after stage 1 is the sampled structures' loss plus the full
    structure's on the same instances, each equal to a forward of its own (eval mode: running statistics,
    so the shared forward's batch does not matter); stage 1 (eq. 8 already favours the full structure)
    and the default add nothing."""
    from virtnet.data.core import Batch
    from virtnet.methods.base import task_loss

    method, model = build(train_full=True)
    batches = {
        s.name: Batch(s.name, inputs(s, n=6, seed=i), torch.arange(6) % s.num_outputs)
        for i, s in enumerate(SPECS)
    }
    phase = method._phase(["a", "b"], 2 * (stage - 1))
    moved_bn(model)  # eval mode from here: the step's norms use running statistics
    torch.manual_seed(5)
    out = method.training_step(model, batches, phase)
    torch.manual_seed(5)
    with torch.no_grad():
        if stage == 1:
            z = {
                t: initial_structures(6, model.num_blocks, model.num_levels, 0.75, torch.device("cpu"))
                for t in batches
            }
        else:
            logits = model.selector_logits_tasks({t: b.x for t, b in batches.items()})
            z = {t: sample(log_probs(logits[t]), 1)[0][:, 0] for t in batches}
    expected = torch.zeros(())
    for t, b in batches.items():
        with torch.no_grad():
            sampled = task_loss(model(b.x, t, model.instance_route(t, z[t], masked=True)), b)
            top = torch.full_like(z[t], model.num_levels - 1)
            full = task_loss(model(b.x, t, model.instance_route(t, top, masked=True)), b)
        torch.testing.assert_close(out[f"loss/{t}"], sampled, rtol=1e-5, atol=1e-6)
        expected = expected + sampled
        if stage > 1:
            torch.testing.assert_close(out[f"loss/{t}/full"], full, rtol=1e-5, atol=1e-6)
            expected = expected + full
        else:
            assert f"loss/{t}/full" not in out
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    assert out["loss"].requires_grad
    default, plain = build()
    moved_bn(plain)
    assert not [k for k in default.training_step(plain, batches, phase) if k.endswith("/full")]


def test_calibration_averages_the_structures_statistics_and_keeps_unused_private_norms():
    """start / forward / end calibration: the first shared norm's running mean is the mean of its two
    batches' means (cumulative average), its variance their unbiased variances' mean; a private norm of a
    level no calibration structure used keeps its statistics from before; momenta come back."""
    _, model = build()
    moved_bn(model)
    spec = SPECS[0]
    blk = model.blocks()[0]
    before_private = {k: v.clone() for k, v in blk.bn2.norm(1).state_dict().items()}
    seen = []
    hook = blk.bn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    saved = model.start_calibration()
    full = torch.full((6, model.num_blocks), model.num_levels - 1)
    for seed in (3, 4):
        model.calibration_forward({spec.name: inputs(spec, n=6, seed=seed)}, {spec.name: full})
    kept = model.end_calibration(saved)
    hook.remove()
    assert len(seen) == 2 and not model.training
    means = torch.stack([t.double().mean(dim=(0, 2, 3)) for t in seen])
    variances = torch.stack([t.double().transpose(0, 1).flatten(1).var(1) for t in seen])
    torch.testing.assert_close(blk.bn1.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blk.bn1.running_var.double(), variances.mean(0), rtol=1e-5, atol=1e-6)
    assert blk.bn1.momentum == 0.1
    name = next(n for n, m in model.estimator_norms().items() if m is blk.bn2.norm(1))
    assert name in kept
    for k, v in blk.bn2.norm(1).state_dict().items():
        assert torch.equal(v, before_private[k]), k


# ---- budgets --------------------------------------------------------------------------------------------
def test_budgeted_choice_is_the_most_probable_within_the_bound_and_never_exceeds_it():
    _, model = build()
    spec = SPECS[0]
    lo, hi = model.cost_range(spec.name)
    x = inputs(spec, n=16)
    with torch.no_grad():
        model.selector.fc.bias.normal_()
        model.selector.fc.weight.mul_(5)
        logp = log_probs(model.selector_logits(x, spec.name))
    every = torch.tensor(list(itertools.product(range(model.num_levels), repeat=model.num_blocks)))
    costs = model.structure_costs(spec.name, every)
    lp = structure_log_prob(logp, every[None].expand(16, -1, -1))
    for f in (0.0, 0.1, 0.3, 0.6, 0.9):
        bound = int(lo + f * (hi - lo))
        z = model.choose(x, spec.name, bound)
        got = model.structure_costs(spec.name, z)
        assert bool((got <= bound).all())
        best = lp.masked_fill(~(costs <= bound)[None], float("-inf")).max(1).values
        torch.testing.assert_close(structure_log_prob(logp, z), best)


def test_budget_levels_and_the_generic_budget_interface():
    method, model = build(budget_levels=[0.0, 0.5, 1.0])
    moved_bn(model)
    levels = method.levels(model, "a")
    assert [lv.index for lv in levels] == [1, 2, 3] and levels[-1].name == "selector"
    x = inputs(SPECS[0])
    lo, _ = model.cost_range("a")
    with torch.no_grad():
        z = model.task_network("a", 1).structures(x)
        assert bool((model.structure_costs("a", z) == lo).all())  # level 1: the cheapest structure
        for lv in levels:
            net = method.export(model, "a", lv.index)
            torch.testing.assert_close(net(x), method.predict(model, x, "a", lv.index))


def test_rand_sel_distribution_matches_a_mean_flops():
    _, model = build()
    lo, hi = model.cost_range("a")
    target = lo + 0.4 * (hi - lo)
    pi = level_distribution(model, "a", target)
    table = torch.tensor(model.block_costs()["flops"], dtype=torch.float64)
    assert abs(model.base_costs("a")["flops"] + float((table * pi.double()).sum()) - target) < 1e-3 * hi
    z = random_chooser(model, {"a": target})(torch.zeros(20000, 1, 8, 8), "a")
    assert abs(float(model.structure_costs("a", z).mean()) - target) < 0.02 * hi


# ---- rho ------------------------------------------------------------------------------------------------
def _toy_run(rho: float, tmp: Path) -> float:
    cfg = {
        "seed": 0,
        "output_dir": str(tmp),
        "data": {
            "tasks": [
                {
                    "name": "a",
                    "dataset": "synthetic",
                    "options": {"num_classes": 4, "size": 8, "channels": 1, "num_train": 256, "num_test": 64},
                }
            ]
        },
        "model": {"name": "resnet", "depth": 8, "width": 0.5},
        "method": {
            "name": "den",
            "rho": rho,
            "stages": 1,
            "estimator_epochs": 3,
            "selector_epochs": 4,
            "selector_lr": 0.05,
            "samples": 8,
            "epsilon": 0.0,
            "budget_levels": [1.0],
        },
        "train": {"batch_size": 32, "lr": 0.05, "eval_every": 0, "progress": False},
        "cost": {"measure_latency": False},
    }
    run = api.train(cfg, log=lambda s: None)
    rows = evaluate_den(run.model, run.taskset, split="test")
    return rows[0]["mean_flops"] / rows[0]["full_flops"]


def test_rho_zero_picks_the_full_model_and_a_large_rho_smaller_ones(tmp_path):
    """Mean FLOPs of the greedy structures over the full model's. With rho = 0 the selector moves to the
    full model wherever a smaller level loses accuracy (on this toy, skipping the first block costs
    nothing, so the greedy structures keep about 0.9 of the FLOPs); rho = 20 cuts them below half."""
    full = _toy_run(0.0, tmp_path / "r0")
    small = _toy_run(20.0, tmp_path / "r20")
    assert full > 0.85
    assert small < 0.5


# ---- training through the loop -------------------------------------------------------------------------
def test_stages_alternate_and_each_moves_only_its_part(tmp_path):
    cfg = {
        "seed": 1,
        "output_dir": str(tmp_path),
        "data": {
            "tasks": [
                {
                    "name": "a",
                    "dataset": "synthetic",
                    "options": {"num_classes": 3, "size": 8, "channels": 1, "num_train": 32, "num_test": 16},
                },
                {
                    "name": "b",
                    "dataset": "synthetic",
                    "options": {
                        "num_classes": 3,
                        "size": 12,
                        "channels": 3,
                        "num_train": 32,
                        "num_test": 16,
                        "seed": 1,
                    },
                },
            ]
        },
        "model": {"name": "resnet", "depth": 8, "width": 0.25},
        "method": {"name": "den", "stages": 2},
        "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 2, "eval_every": 0, "progress": False},
        "cost": {"measure_latency": False},
    }
    run = api.train(cfg, log=lambda s: None)
    names = [p["name"] for p in run.summary["phases"]]
    assert names == ["estimator-1", "selector-1", "estimator-2", "selector-2", "calibrate"]
    ck = {k: api.load(tmp_path / "checkpoints" / f"phase-{k}.json").model.state_dict() for k in range(5)}
    start = api.load(tmp_path / "checkpoints" / "start.json").model.state_dict()
    prev = start
    for k in range(4):
        cur = ck[k]
        sel = [n for n in cur if n.startswith("selector.")]
        est = [n for n in cur if not n.startswith("selector.") and n != "den_progress"]
        moved = [n for n in (est if k % 2 == 0 else sel) if not torch.equal(cur[n], prev[n])]
        fixed = [n for n in (sel if k % 2 == 0 else est) if not torch.equal(cur[n], prev[n])]
        assert moved, k
        assert not fixed, (k, fixed[:3])  # weights and running statistics of the other part
        prev = cur
    # the calibration phase: not one parameter moves, only the estimator's batch-norm statistics
    model = api.load(tmp_path / "checkpoints" / "phase-4.json").model
    params = {n for n, _ in model.named_parameters()}
    changed = [n for n in ck[4] if not torch.equal(ck[4][n], ck[3][n])]
    assert changed and not [n for n in changed if n in params or n.startswith("selector.")], changed[:3]
    assert all(n.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked") for n in changed)


def test_the_selector_stage_decays_and_converges(tmp_path):
    method = make_method("den", {"stages": 3, "converge_tol": 0.5})
    hist = [
        {"phase": "selector-1", "train": {"loss/a/reward": 1.0}},
        {"phase": "selector-2", "train": {"loss/a/reward": 0.9}},
    ]
    done = method.phases(["a"])[:4]
    after = method.next_phase(["a"], done, hist)  # improved by 10 % < 50 %: converged, then calibration
    assert after.name == "calibrate" and after.info["forward_only"] and after.index == 4
    assert method.next_phase(["a"], [*done, after], hist) is None
    assert method.next_phase(["a"], done, hist[:1]).name == "estimator-3"
    plain = make_method("den", {"stages": 3, "converge_tol": 0.5, "calibration_epochs": 0})
    assert plain.next_phase(["a"], done, hist) is None
    specs = method.optimizers(build()[1], done[2])
    assert specs[0].kind == "sgd" and specs[0].options["nesterov"]
    assert specs[0].param_groups[0]["lr_scale"] == pytest.approx(0.1)
    assert method.optimizers(build()[1], done[3])[0].kind == "adam"


# ---- bad input ------------------------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_input_gives_one_line_errors(tmp_path):
    method, model = build()
    n, h = model.num_blocks, model.num_levels
    with pytest.raises(BudgetError, match="out of range") as e:
        model.structure_route("a", [h] + [0] * (n - 1))
    _one_line(e)
    with pytest.raises(BudgetError, match="blocks") as e:
        model.structure_route("a", [0] * (n + 1))
    _one_line(e)
    with pytest.raises(BudgetError, match="out of range"):
        model.instance_route("a", torch.full((2, n), h))
    with pytest.raises(TaskError, match="mixes tasks") as e:
        model.choose(inputs(SPECS[0]), ["a", "b", "a"])
    _one_line(e)
    lo, _ = model.cost_range("a")
    with pytest.raises(BudgetError, match="cheapest") as e:
        model.choose(inputs(SPECS[0]), "a", lo - 1)
    _one_line(e)
    with pytest.raises(ConfigError, match="level_widths"):
        build(BACKBONES["vgg"], level_widths=[0.0, 0.5, 1.0])
    with pytest.raises(ConfigError):
        build(levels=3, level_widths=[0.5, 1.0])
    # a selector trained for another estimator
    from virtnet.train.checkpoint import save_checkpoint

    _, other = build(levels=2)
    path = tmp_path / "other"
    save_checkpoint(path, other.state_dict(), meta={"structure": other.structure()})
    with pytest.raises(CheckpointError, match="another estimator") as e:
        method.load_selector(model, str(path) + ".json")
    _one_line(e)
    same = copy.deepcopy(model)
    with torch.no_grad():
        for p in same.selector.parameters():
            p.add_(1)
    path2 = tmp_path / "same"
    save_checkpoint(path2, same.state_dict(), meta={"structure": same.structure()})
    method.load_selector(model, str(path2) + ".json")
    pairs = zip(model.selector.parameters(), same.selector.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_torch_export_of_the_deployable_groups_a_batch():
    method, model = build()
    moved_bn(model)
    x = inputs(SPECS[1], n=7)
    net = method.export(model, "b", 1)
    prog = torch.export.export(net, (x,))
    with torch.no_grad():
        torch.testing.assert_close(prog.module()(x), net(x), rtol=1e-5, atol=1e-5)
    assert net(x).shape == (7, 4)
    assert Route("b", instance=torch.zeros(1, 1)).static().instance is None


# ---- docs -----------------------------------------------------------------------------------------------
def test_the_docs_list_every_option():
    text = (Path(__file__).resolve().parents[1] / "docs" / "methods" / "den.md").read_text()
    section = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    keys = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert keys == list(DENConfig.model_fields)
