"""PackNet's promises on small networks the tests define themselves: the packed ownership map, exact
pruning, frozen weights under momentum and weight decay, cached inference, export, storage, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from virtnet.errors import CheckpointError, ConfigError, TaskError
from virtnet.methods import make_method
from virtnet.methods.packnet import (
    OwnershipMap,
    PackNet,
    PackNetModel,
    bits_per_weight,
    incremental_fractions,
    pack_bits,
    packed_size,
    unpack_bits,
    wrap,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one thread is fastest, and the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def body() -> nn.Sequential:
    """A user's network: two convolutions (one with a bias), batch norms, a linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
    )


def user_model(tasks=("a", "b", "c"), seed: int = 0, **kw) -> PackNetModel:
    torch.manual_seed(seed)
    return wrap(body(), {t: 3 for t in tasks}, feature_dim=16, **kw)


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def outputs(model: PackNetModel, tasks) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return {t: model(X, t) for t in tasks}


# ---- packed ownership map ---------------------------------------------------------------------------
@pytest.mark.parametrize("n, bits", [(1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (255, 8)])
def test_bits_per_weight_is_ceil_log2_n_plus_1(n, bits):
    assert bits_per_weight(n) == bits == math.ceil(math.log2(n + 1))


def test_pack_bits_hand_computed():
    # 2 bits each: 01 10 11 00 | 01 (+ 6 zero bits) -> 0b01101100 = 108, 0b01000000 = 64
    packed = pack_bits(torch.tensor([1, 2, 3, 0, 1]), 2)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [108, 64]
    assert unpack_bits(packed, 5, 2).tolist() == [1, 2, 3, 0, 1]
    # 3 bits each: 101 011 11|1 -> 0b10101111 = 175, 0b10000000 = 128
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [175, 128]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (1001,), generator=g).to(torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.numel() == packed_size(1001, bits) == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, 1001, bits), values)


def test_pack_refuses_values_that_do_not_fit():
    with pytest.raises(ValueError, match="values must lie in"):
        pack_bits(torch.tensor([4]), 2)


def test_ownership_map_pack_and_load_packed():
    omap = OwnershipMap({"a.weight": (2, 3), "b.weight": (5,)}, num_tasks=3)
    omap["a.weight"].copy_(torch.tensor([[0, 1, 2], [3, 3, 1]], dtype=torch.uint8))
    omap["b.weight"].copy_(torch.tensor([2, 0, 0, 1, 3], dtype=torch.uint8))
    other = OwnershipMap({"a.weight": (2, 3), "b.weight": (5,)}, num_tasks=3)
    other.load_packed(omap.pack())
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(omap.items(), other.items(), strict=True))
    assert omap.packed_bytes() == 3  # 11 weights x 2 bits = 22 bits
    assert omap.counts() == {0: 3, 1: 3, 2: 2, 3: 3}


# ---- pruning ----------------------------------------------------------------------------------------
def tiny() -> PackNetModel:
    """A 2x2 convolution (4 weights) and a 4 -> 2 linear layer (8 weights), no biases, set by hand."""
    net = nn.Sequential(nn.Conv2d(1, 1, 2, bias=False), nn.Flatten(), nn.Linear(4, 2, bias=False))
    model = wrap(net, {"a": nn.Identity(), "b": nn.Identity()})
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.4, -0.1, 0.3, -0.2]).reshape(1, 1, 2, 2))
        net[2].weight.copy_(torch.tensor([[0.1, -0.8, 0.3, -0.2], [0.5, 0.05, -0.7, 0.6]]))
    return model


def test_prune_hand_computed():
    model = tiny()
    conv, lin = model.net[0].weight, model.net[2].weight
    assert model.begin_task("a") == 4 + 8
    report = model.prune("a", 0.5)
    assert report == {"0.weight": (4, 2), "2.weight": (8, 4)}
    assert model.ownership["0.weight"].reshape(-1).tolist() == [1, 0, 1, 0]
    assert model.ownership["2.weight"].tolist() == [[0, 1, 0, 0], [1, 0, 1, 1]]
    assert torch.equal(conv.reshape(-1), torch.tensor([0.4, 0.0, 0.3, 0.0]))
    assert torch.equal(lin, torch.tensor([[0.0, -0.8, 0.0, 0.0], [0.5, 0.0, -0.7, 0.6]]))
    # task b claims the freed weights; pruning b never touches a's
    assert model.begin_task("b") == 2 + 4
    with torch.no_grad():
        conv.view(-1)[1], conv.view(-1)[3] = 0.9, -0.05
    assert model.prune("b", 0.5)["0.weight"] == (2, 1)
    assert model.ownership["0.weight"].reshape(-1).tolist() == [1, 2, 1, 0]
    assert torch.equal(conv.reshape(-1), torch.tensor([0.4, 0.9, 0.3, 0.0]))
    # task a's network is its own weights only, task b's includes a's
    assert torch.equal(model.task_weights("a")["0.weight"].reshape(-1), torch.tensor([0.4, 0.0, 0.3, 0.0]))
    assert torch.equal(model.task_weights("b")["0.weight"].reshape(-1), torch.tensor([0.4, 0.9, 0.3, 0.0]))


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_prune_removes_exactly_the_fraction_of_each_layer_by_magnitude(ratio):
    model = user_model()
    model.begin_task("a")
    original = {n: model.net.get_parameter(n).detach().clone() for n in model.prunable}
    report = model.prune("a", ratio)
    for name, owner in model.ownership.items():
        n = owner.numel()  # 54, 432 and 512 weights: 0.75 x 54 = 40.5 rounds half up to 41
        k = math.floor(ratio * n + 0.5)
        assert report[name] == (n, k)
        assert int((owner == 0).sum()) == k
        w = model.net.get_parameter(name).detach()
        assert torch.all(w[owner == 0] == 0) and torch.equal(w[owner == 1], original[name][owner == 1])
        # the smallest-magnitude weights went
        assert original[name][owner == 0].abs().max() <= original[name][owner == 1].abs().min()
    # second task: only its own weights are eligible
    model.begin_task("b")
    before = {n: model.net.get_parameter(n).detach().clone() for n in model.prunable}
    owner_a = {n: (o == 1).clone() for n, o in model.ownership.items()}
    report = model.prune("b", 0.5)
    for name, owner in model.ownership.items():
        owned_b = math.floor(ratio * owner.numel() + 0.5)
        assert report[name] == (owned_b, math.floor(0.5 * owned_b + 0.5))
        assert torch.equal(owner == 1, owner_a[name])
        assert torch.equal(model.net.get_parameter(name)[owner_a[name]], before[name][owner_a[name]])


def test_incremental_pruning_reaches_the_ratio():
    fr = incremental_fractions(0.75, 3)
    assert fr == pytest.approx([0.25, 1 / 3, 0.5])
    assert math.prod(1 - f for f in fr) == pytest.approx(0.25)
    assert incremental_fractions(0.5, 1) == [0.5] and incremental_fractions(0.0, 2) == []


# ---- freezing under the optimizer -------------------------------------------------------------------
def train_steps(
    model: PackNetModel, task: str, opt: torch.optim.Optimizer, steps: int, restore: bool
) -> None:
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        model.prepare_step(task)
        loss = nn.functional.cross_entropy(model(x, task), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if restore:
            model.restore_frozen(task)


def state_of(model: PackNetModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_earlier_weights_bit_identical_under_momentum_and_weight_decay(optimizer):
    model = user_model()
    model.begin_task("a")
    opt = torch.optim.SGD(model.trainable_parameters("a"), lr=0.1, momentum=0.9)
    train_steps(model, "a", opt, 3, restore=True)
    model.prune("a", 0.5)
    before = state_of(model)
    out_a = outputs(model, ["a"])["a"]
    model.begin_task("b")
    params = model.trainable_parameters("b")
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)
    else:
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.5)
    train_steps(model, "b", opt, 40, restore=True)
    after = model.state_dict()
    moved_b = False
    for name, owner in model.ownership.items():
        key = f"net.{name}"
        a_owned = owner == 1
        assert torch.equal(after[key][a_owned], before[key][a_owned]), name
        moved_b |= not torch.equal(after[key][owner == 2], before[key][owner == 2])
    assert moved_b
    for k in before:  # task a's biases, batch norm (parameters and running statistics) and head
        if (
            not k.startswith(("ownership.", "num_added", "heads.b."))
            and k[len("net.") :] not in model.prunable
        ):
            assert torch.equal(after[k], before[k]), k
    assert torch.equal(outputs(model, ["a"])["a"], out_a)


def test_masking_gradients_alone_does_not_freeze():
    """The trap restore_frozen closes: with a zero gradient, momentum and weight decay still move weights."""
    model = user_model()
    model.begin_task("a")
    model.prune("a", 0.5)
    model.begin_task("b")
    before = state_of(model)
    opt = torch.optim.SGD(model.trainable_parameters("b"), lr=0.1, momentum=0.9, weight_decay=0.05)
    train_steps(model, "b", opt, 3, restore=False)
    name = model.prunable[0]
    a_owned = model.ownership[name] == 1
    assert not torch.equal(model.net.get_parameter(name)[a_owned], before[f"net.{name}"][a_owned])


def test_a_diverged_later_task_leaves_earlier_tasks_intact():
    """NaN in a later task's weights or gradients must not reach earlier tasks (NaN * 0 is NaN)."""
    model = user_model()
    model.begin_task("a")
    model.prune("a", 0.5)
    out_a = outputs(model, ["a"])["a"]
    exported = PackNet().export(model, "a")
    model.begin_task("b")
    opt = torch.optim.SGD(model.trainable_parameters("b"), lr=0.1, momentum=0.9, weight_decay=0.05)
    model.train()
    model.prepare_step("b")
    x = X.clone()
    x[0, 0, 0, 0] = float("nan")  # a diverged step: NaN loss, NaN gradients
    nn.functional.cross_entropy(model(x, "b"), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    model.restore_frozen("b")
    w = model.net.get_parameter(model.prunable[0])
    assert torch.isnan(w[model.ownership[model.prunable[0]] == 2]).all()
    assert torch.equal(outputs(model, ["a"])["a"], out_a)
    with torch.no_grad():
        assert torch.equal(PackNet().export(model, "a")(X), exported(X))


def test_frozen_batchnorm_after_the_first_task_and_task_specific_option():
    shared = user_model()
    shared.begin_task("a")
    shared.prune("a", 0.5)
    shared.begin_task("b")
    shared.train()
    shared.prepare_step("b")
    assert not shared.net[1].training and not shared.net[4].training
    names = {id(p) for p in shared.trainable_parameters("b")}
    assert id(shared.net[1].weight) not in names and id(shared.net[0].bias) not in names

    own = user_model(task_specific_bn=True, task_specific_bias=True)
    own.begin_task("a")
    opt = torch.optim.SGD(own.trainable_parameters("a"), lr=0.1, momentum=0.9)
    train_steps(own, "a", opt, 2, restore=True)
    own.prune("a", 0.5)
    before = state_of(own)
    out_a = outputs(own, ["a"])["a"]
    own.begin_task("b")
    # b's copies start from a's
    assert torch.equal(own.task_state["b"].tensors()["1.running_mean"], own.net[1].running_mean)
    opt = torch.optim.SGD(own.trainable_parameters("b"), lr=0.1, momentum=0.9, weight_decay=0.01)
    train_steps(own, "b", opt, 5, restore=True)
    assert own.net[1].training  # task-specific batch norm trains in train mode
    after = own.state_dict()
    for k in ("net.1.weight", "net.1.running_mean", "net.1.running_var", "net.0.bias", "net.4.running_var"):
        assert torch.equal(after[k], before[k]), k
    copies = own.task_state["b"].tensors()
    assert not torch.equal(copies["1.running_mean"], own.net[1].running_mean)
    assert not torch.equal(copies["0.bias"], own.net[0].bias)
    assert torch.equal(outputs(own, ["a"])["a"], out_a)


# ---- inference --------------------------------------------------------------------------------------
def test_inference_masks_once_per_task_switch():
    model = user_model()
    for t in ("a", "b"):
        model.begin_task(t)
        model.prune(t, 0.5)
    model.eval()
    with torch.no_grad():
        model(X, "a")
        model(X, "a")
        assert model.mask_builds == 1
        model(X, "b")
        model(X, "b")
        assert model.mask_builds == 2
        first = model(X, "a")
        assert model.mask_builds == 3
        with torch.no_grad():
            w = model.net.get_parameter(model.prunable[0])
            w.mul_(2.0)  # a weight changed in place: the cache must notice
        second = model(X, "a")
        assert model.mask_builds == 4 and not torch.equal(first, second)


def test_masking_is_not_in_place_and_export_equals_forward():
    model = user_model()
    for t in ("a", "b", "c"):
        model.begin_task(t)
        with torch.no_grad():  # give each task's weights distinct values
            for n, o in model.ownership.items():
                w = model.net.get_parameter(n)
                w.copy_(torch.where(o == model.task_number(t), torch.randn_like(w), w))
        model.prune(t, 0.5)
    raw = {n: model.net.get_parameter(n).detach().clone() for n in model.prunable}
    outs = outputs(model, ["a", "b", "c"])
    assert not torch.equal(outs["a"], outs["b"])
    for n in model.prunable:  # evaluating a task leaves every weight intact
        assert torch.equal(model.net.get_parameter(n), raw[n])
    for t in ("a", "b", "c"):
        exported = PackNet().export(model, t)
        names = [n for n, _ in exported.named_parameters()]
        assert all(n.startswith(("stem.", "trunk.", "head.")) for n in names)
        with torch.no_grad():
            assert torch.equal(exported(X), outs[t])
        # the export shares nothing: zeroing it leaves the model alone
        with torch.no_grad():
            for p in exported.parameters():
                p.zero_()
        assert torch.equal(outputs(model, [t])[t], outs[t])
    # later tasks' weights are zeros in an earlier task's export
    ex_a = PackNet().export(model, "a")
    w = ex_a.state_dict()["trunk.0.weight"]
    assert torch.all(w[model.ownership["0.weight"] != 1] == 0)


def test_bad_tasks_at_inference():
    model = user_model()
    model.begin_task("a")
    model.eval()
    with pytest.raises(TaskError, match="task 4 does not exist"):
        model(X, 4)
    with pytest.raises(TaskError, match="unknown task 'zz'"):
        model(X, "zz")
    with pytest.raises(TaskError, match="task 'b' has not been added yet"):
        model(X, "b")
    method = PackNet()
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        method.predict(model, X, "nope")
    assert torch.equal(model(X, 1), model(X, "a"))


def test_no_free_weights_left_is_a_clear_error():
    model = user_model(tasks=("a", "b"))
    model.begin_task("a")  # task a keeps everything (no pruning)
    model.begin_task("b")
    with pytest.raises(ConfigError, match="no free weights remain for task 'b'"):
        model.prepare_step("b")


# ---- storage, save and load -------------------------------------------------------------------------
def test_storage_in_bytes_hand_computed():
    model = user_model()
    s = model.storage()
    prunable = 6 * 1 * 9 + 8 * 6 * 9 + 16 * 32  # conv, conv, linear weights
    assert s["base_weights"] == 4 * prunable
    # conv bias 6, BN 6+6 and 8+8 affine, linear bias 16; BN running stats 2x6, 2x8 float + 2 int64
    assert s["shared_other"] == 4 * (6 + 12 + 16 + 16) + 4 * (12 + 16) + 2 * 8
    assert s["ownership_bits"] == 2
    assert s["ownership_packed"] == math.ceil(prunable * 2 / 8)
    assert s["tasks"] == {t: 4 * (16 * 3 + 3) for t in "abc"}
    assert s["total"] == s["base_weights"] + s["shared_other"] + s["ownership_packed"] + 3 * 4 * 51


def test_ownership_survives_save_and_load(tmp_path):
    model = user_model()
    for t in ("a", "b"):
        model.begin_task(t)
        model.prune(t, 0.5)
    path = tmp_path / "own"
    model.save_ownership(path)
    assert (tmp_path / "own.safetensors").stat().st_size < model.ownership.numel()  # packed: 2 bits each
    fresh = user_model(seed=3)
    fresh.load_ownership(path)
    for (n, a), (_, b) in zip(model.ownership.items(), fresh.ownership.items(), strict=True):
        assert torch.equal(a, b), n
    # and through the state dict (checkpoints)
    other = user_model(seed=4)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.ownership["8.weight"], model.ownership["8.weight"])
    assert other.added == ["a", "b"]


def test_ownership_for_another_network_is_refused(tmp_path):
    model = user_model()
    model.begin_task("a")
    model.save_ownership(tmp_path / "own")
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Conv2d(1, 7, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(7 * 64, 16))
    with pytest.raises(CheckpointError, match="saved for a different network") as e:
        wrap(wider, {t: 3 for t in "abc"}, feature_dim=16).load_ownership(tmp_path / "own")
    assert "\n" not in str(e.value)
    renamed = wrap(nn.Sequential(nn.Identity(), *body()), {t: 3 for t in "abc"}, feature_dim=16)
    with pytest.raises(CheckpointError, match="layer '0.weight' where the model has '1.weight'"):
        renamed.load_ownership(tmp_path / "own")
    with pytest.raises(CheckpointError, match="saved for tasks"):
        user_model(tasks=("x", "y", "z")).load_ownership(tmp_path / "own")


def test_config_errors():
    with pytest.raises(ConfigError, match="prune_ratios"):
        make_method("packnet", {"prune_ratios": [0.5, 1.0]})
    with pytest.raises(ConfigError, match="2 ratios for 4 tasks"):
        make_method("packnet", {"prune_ratios": [0.5, 0.5]}).phases(["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="needs feature_dim"):
        wrap(body(), {"a": 3})
    with pytest.raises(ConfigError, match="no shared convolution or linear layer"):
        wrap(nn.Sequential(nn.ReLU()), {"a": nn.Identity()})


def test_packed_storage_keeps_owned_weights_only_and_round_trips(tmp_path):
    """The deployment format: owned values + packed map + the rest; free weights are implied zeros."""
    model = user_model(task_specific_bn=True)
    for t in ("a", "b", "c"):  # every task pruned: free weights remain, as after adding a task
        model.begin_task(t)
        model.prune(t, 0.5)
    before = outputs(model, "abc")
    s = model.storage()
    free = model.ownership.counts()[0]
    assert free > 0 and s["base_weights_owned"] == s["base_weights"] - 4 * free
    assert s["total_packed"] == s["total"] - 4 * free
    tensors, _ = model.packed_state()
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == s["total_packed"]

    model.save_packed(tmp_path / "packed")
    fresh = user_model(seed=7, task_specific_bn=True)  # other random weights everywhere
    fresh.load_packed(tmp_path / "packed")
    after = outputs(fresh, "abc")
    for t in "abc":
        assert torch.equal(after[t], before[t]), t
    for (n, a), (_, b) in zip(model.ownership.items(), fresh.ownership.items(), strict=True):
        assert torch.equal(a, b), n
        assert torch.equal(model.net.get_parameter(n), fresh.net.get_parameter(n)), n


def test_packed_storage_errors(tmp_path):
    model = user_model()
    with pytest.raises(ConfigError, match="free weights of '0.weight' are not zero"):
        model.packed_state()  # nothing added yet: every weight is free and random
    model.begin_task("a")
    model.prune("a", 0.5)
    model.save_packed(tmp_path / "p")
    with pytest.raises(CheckpointError, match="saved for tasks"):
        user_model(tasks=("x", "y", "z")).load_packed(tmp_path / "p")
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Conv2d(1, 7, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(7 * 64, 16))
    with pytest.raises(CheckpointError, match="saved for a different network"):
        wrap(wider, {t: 3 for t in "abc"}, feature_dim=16).load_packed(tmp_path / "p")
    data = (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "p.safetensors").write_bytes(data[:-4] + b"\0\0\0\1")
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        user_model().load_packed(tmp_path / "p")
    with pytest.raises(CheckpointError, match="not found"):
        user_model().load_packed(tmp_path / "missing")
