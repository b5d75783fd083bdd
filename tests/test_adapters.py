"""Residual adapter layers (virtnet.nn.adapters), compression algebra and the decathlon score: exact
algebra on hand-made numbers, fused against unfused, and parallel adapters plugged into a network
defined here."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from virtnet.errors import ConfigError, TaskError
from virtnet.methods.adapters import decathlon_score, joint_fraction, single_fraction
from virtnet.nn import Route
from virtnet.nn.adapters import (
    AdapterBank,
    ParallelAdapterConv2d,
    ParallelAdapters,
    SeriesAdapterConv2d,
    adaptable_convs,
    fold_parallel,
    unfold_parallel,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dyadic(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random multiples of 1/64 in [-2, 2]: sums and differences of these are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 129, shape, generator=g).float() / 64


# ---- folding -------------------------------------------------------------------------------------------
def test_fold_adds_alpha_to_the_kernel_centre_only():
    f = torch.zeros(2, 3, 3, 3)
    alpha = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    g = fold_parallel(f, alpha)
    assert torch.equal(g[:, :, 1, 1], alpha)
    g[:, :, 1, 1] = 0
    assert torch.equal(g, f)
    # a 5x3 kernel's centre is (2, 1)
    g = fold_parallel(torch.zeros(2, 3, 5, 3), alpha)
    assert torch.equal(g[:, :, 2, 1], alpha) and g.abs().sum() == alpha.abs().sum()


def test_fuse_and_unfuse_round_trip_exactly():
    f, alpha = dyadic(4, 3, 3, 3, seed=1), dyadic(4, 3, seed=2)
    g = fold_parallel(f, alpha)
    assert torch.equal(unfold_parallel(g, f), alpha)
    assert torch.equal(fold_parallel(f, unfold_parallel(g, f)), g)
    assert torch.equal(f, dyadic(4, 3, 3, 3, seed=1))  # folding wrote nothing into f


def test_unfold_refuses_a_kernel_that_is_not_a_fusion():
    f = dyadic(2, 2, 3, 3)
    g = fold_parallel(f, dyadic(2, 2, seed=3))
    g[0, 0, 0, 0] += 1
    with pytest.raises(ConfigError, match="not a fusion"):
        unfold_parallel(g, f)


@pytest.mark.parametrize("impl", ["fold", "branch"])
def test_parallel_layer_is_f_star_x_plus_alpha_star_x(impl):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    layer = ParallelAdapterConv2d(conv, ["a", "b"], impl=impl)
    x = torch.randn(2, 3, 9, 9)
    route = Route("a")
    assert torch.equal(layer(x, route), conv(x))  # alpha = 0: exactly the universal convolution
    with torch.no_grad():
        layer.adapter.alphas["a"].normal_()
    alpha = layer.adapter.alphas["a"]
    expected = conv(x) + F.conv2d(x, alpha[:, :, None, None], stride=2)
    assert torch.allclose(layer(x, route), expected, atol=1e-5)
    assert torch.equal(layer(x, Route("b")), conv(x))  # other domains untouched
    fused = layer.fuse("a")
    assert type(fused) is nn.Conv2d and fused.weight is not conv.weight
    assert torch.allclose(fused(x), layer(x, route), atol=1e-5)
    back = ParallelAdapterConv2d(conv, ["a", "b"])
    back.unfuse(fused, "a")
    assert torch.allclose(back.adapter.alphas["a"], alpha, atol=1e-6)
    assert torch.allclose(back(x, route), layer(x, route), atol=1e-5)


def test_fold_and_branch_give_alpha_the_same_gradient():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    layers = [ParallelAdapterConv2d(conv, ["a"], impl=impl) for impl in ("fold", "branch")]
    with torch.no_grad():
        layers[0].adapter.alphas["a"].normal_()
        layers[1].adapter.alphas["a"].copy_(layers[0].adapter.alphas["a"])
    x = torch.randn(2, 3, 7, 7)
    for layer in layers:
        layer(x, Route("a")).square().sum().backward()
    grads = [layer.adapter.alphas["a"].grad for layer in layers]
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-4)
    assert conv.weight.grad is not None  # the caller freezes f (requires_grad=False); the layer does not


def test_series_layer_and_its_fusion():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    layer = SeriesAdapterConv2d(conv, ["a"])
    x = torch.randn(3, 4, 6, 6)
    layer.eval()
    assert torch.equal(layer(x, Route("a")), conv(x))  # alpha = 0: the identity adapter
    with torch.no_grad():
        layer.adapter.alphas["a"].normal_(0, 0.5)
        bn = layer.norms["a"]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    z = conv(x)
    expected = z + F.conv2d(bn(z), layer.adapter.alphas["a"][:, :, None, None])
    assert torch.allclose(layer(x, Route("a")), expected, atol=1e-6)
    fused = layer.fuse("a")
    assert fused.bias is not None
    assert torch.allclose(fused(x), expected, atol=1e-5)
    with torch.no_grad():  # eval without autograd: the layer runs (and caches) its own fusion
        assert torch.allclose(layer(x, Route("a")), expected, atol=1e-5)


def test_the_eval_cache_follows_in_place_changes():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    layer = ParallelAdapterConv2d(conv, ["a", "b"]).eval()
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        assert torch.equal(layer(x, Route("a")), conv(x))
        layer.adapter.alphas["a"].add_(0.5)  # as an optimizer step or load_state_dict would
        expected = conv(x) + F.conv2d(x, layer.adapter.alphas["a"][:, :, None, None])
        assert torch.allclose(layer(x, Route("a")), expected, atol=1e-5)
        assert torch.equal(layer(x, Route("b")), conv(x))  # another domain: recomputed, not the cached one
        conv.weight.mul_(2)
        expected = conv(x) + F.conv2d(x, layer.adapter.alphas["a"][:, :, None, None])
        assert torch.allclose(layer(x, Route("a")), expected, atol=1e-5)


def test_layers_need_the_domain_and_know_their_domains():
    layer = ParallelAdapterConv2d(nn.Conv2d(2, 2, 3, padding=1), ["a"])
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(TaskError, match="need the domain"):
        layer(x)
    with pytest.raises(TaskError, match="domain 'z' has no adapters"):
        layer(x, Route("z"))
    with pytest.raises(ConfigError, match="1x1 kernel"):
        ParallelAdapterConv2d(nn.Conv2d(2, 2, 1), ["a"])


# ---- compression ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_svd_with_k_equal_c_reproduces_the_adapters(shared):
    torch.manual_seed(0)
    c, domains = 8, ["a", "b", "c"]
    bank = AdapterBank(c, c, domains, rank=c, shared=shared)
    with torch.no_grad():
        for d in domains:
            bank.alphas[d].normal_()
    before = {d: bank.alpha(d).clone() for d in domains}
    bank.compress()
    assert bool(bank.compressed)
    for d in domains:
        assert torch.allclose(bank.alpha(d), before[d], atol=1e-5)
    t, k = len(domains), c
    if shared:
        assert bank.shared_count() == c * k and sum(bank.domain_count(d) for d in domains) == t * c * k
        assert (
            Fraction(bank.shared_count() + t * c * k, t * c * c) == joint_fraction(t, c, k) == Fraction(4, 3)
        )
    else:
        assert sum(bank.domain_count(d) for d in domains) == t * 2 * c * k


def test_svd_rank_counts_follow_the_formula_and_k_larger_than_c_is_an_error():
    torch.manual_seed(0)
    c, k, domains = 8, 4, ["a", "b", "c"]
    bank = AdapterBank(c, c, domains, rank=k)
    with torch.no_grad():
        for d in domains:
            bank.alphas[d].normal_()
    bank.compress()
    total = bank.shared_count() + sum(bank.domain_count(d) for d in domains)
    assert total == 3 * 8 * 4 + 8 * 4 == 128
    assert joint_fraction(3, 8, 4) == Fraction(128, 192) == Fraction(2, 3)
    assert single_fraction(8, 4) == 1
    assert [p.shape for p in bank.trainable("b")] == [torch.Size([8, 4])]  # gamma only: beta is shared
    # the best rank-K approximation: the residual is the discarded singular values
    stacked = torch.cat([bank.alphas[d] for d in bank.domains], dim=1)
    s = torch.linalg.svdvals(stacked)
    approx = torch.cat([bank.alpha(d) for d in bank.domains], dim=1)
    assert torch.allclose(torch.linalg.norm(stacked - approx), s[k:].norm(), rtol=1e-4)
    with pytest.raises(ConfigError, match="K = 9 is larger than C = 8"):
        AdapterBank(8, 8, domains, rank=9)
    with pytest.raises(ConfigError, match="larger than C = 4"):
        AdapterBank(8, 4, domains, rank=5, shared=False)


# ---- the decathlon score -------------------------------------------------------------------------------
def test_decathlon_score_on_hand_made_numbers():
    base = {"a": 10.0, "b": 20.0, "c": 5.0}
    # a: E=10 (the baseline) -> 1000 * (10/20)^2 = 250; b: E=0 -> 1000; c: E=12 >= E_max=10 -> 0
    s = decathlon_score({"a": 10.0, "b": 0.0, "c": 12.0}, base)
    assert s.per_domain == {"a": 250.0, "b": 1000.0, "c": 0.0}
    assert s.total == 1250.0
    # a: E=5 -> 1000 * (15/20)^2 = 562.5; fractions give the same score as percentages
    assert decathlon_score({"a": 5.0}, base).total == 562.5
    assert decathlon_score({"a": 0.05}, {"a": 0.10}).total == pytest.approx(562.5)
    with pytest.raises(ConfigError, match="no baseline error for domain 'z'"):
        decathlon_score({"z": 1.0}, base)
    with pytest.raises(ConfigError, match="must be > 0"):
        decathlon_score({"a": 1.0}, {"a": 0.0})


# ---- plug-in on a network defined here -----------------------------------------------------------------
class SmallNet(nn.Module):
    """A user's network: it knows nothing of domains or routes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 5, stride=2, padding=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.mix = nn.Conv2d(8, 8, 1)  # 1x1: no kernel centre to adapt, left universal
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.features(x))
        return self.fc(h.mean(dim=(2, 3)))


def trained_smallnet() -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 1, 8, 8))  # non-trivial running statistics
    return net.eval()


def test_plugin_wraps_the_convolutions_by_name_and_starts_as_the_pretrained_network():
    net = trained_smallnet()
    adapted = ParallelAdapters(net, ["a", "b"], head="fc", num_outputs={"b": 5})
    assert adapted.conv_names == ["features.0", "features.3"]
    assert adapted.norm_names == ["features.1", "features.4"]
    adapted.eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(adapted(x, domain="a"), net(x))  # alpha = 0, copies of the BNs and head
    assert adapted(x, domain="b").shape == (4, 5)
    with pytest.raises(TaskError, match="domain 'c' has no adapters"):
        adapted(x, domain="c")


def test_plugin_training_leaves_the_users_network_untouched_and_fuses_exactly():
    net = trained_smallnet()
    universal = {k: v.clone() for k, v in net.state_dict().items()}
    adapted = ParallelAdapters(net, ["a", "b"], head="fc")
    opt = torch.optim.SGD(adapted.domain_parameters("a"), lr=0.1, momentum=0.9, weight_decay=0.1)
    adapted.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = F.cross_entropy(adapted(x, domain="a"), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in net.state_dict().items():
        assert torch.equal(v, universal[k]), k  # weights and batch-norm statistics
    assert adapted.adapters["features-0"].alphas["a"].abs().sum() > 0
    assert adapted.adapters["features-0"].alphas["b"].abs().sum() == 0
    bn_a = adapted.norms["features-1"].norm("a")
    assert int(bn_a.num_batches_tracked) == int(universal["features.1.num_batches_tracked"]) + 3
    assert not torch.equal(bn_a.running_mean, universal["features.1.running_mean"])

    adapted.eval()
    x = torch.randn(5, 1, 8, 8)
    fused = adapted.fuse("a")
    assert type(fused) is SmallNet
    assert torch.allclose(fused(x), adapted(x, domain="a"), atol=1e-5)
    assert not torch.equal(fused.features[0].weight, net.features[0].weight)
    again = ParallelAdapters(trained_smallnet(), ["a"], head="fc").eval()
    again.unfuse(fused, "a")  # take the domain out of the fused copy
    assert torch.allclose(again(x, domain="a"), adapted(x, domain="a"), atol=1e-5)
    with pytest.raises(ConfigError, match="not a fusion"):
        fused.features[0].weight.data[0, 0, 0, 0] += 1
        again.unfuse(fused, "a")


def test_plugin_bad_input_is_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match="has no convolution to adapt.*Linear"):
        ParallelAdapters(mlp, ["a"])
    net = trained_smallnet()
    with pytest.raises(ConfigError, match="layer 'fc' is a Linear"):
        ParallelAdapters(net, ["a"], layers=["fc"])
    with pytest.raises(ConfigError, match="layer 'mix' has a 1x1 kernel"):
        ParallelAdapters(net, ["a"], layers=["mix"])
    with pytest.raises(ConfigError, match="'layer9' matches no module"):
        ParallelAdapters(net, ["a"], layers=["layer9"])
    assert [n for n, _ in adaptable_convs(net, ["features.*"])] == ["features.0", "features.3"]
    with pytest.raises(ConfigError, match="layer .features.1. is a BatchNorm2d"):
        adaptable_convs(net, ["features.*", "features.1"])


def _randomise_norms(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("backbone", ["resnet", "wrn"])
def test_series_fusion_absorbs_biases_only_into_the_batch_norm_that_follows(backbone):
    """Post-activation blocks: conv1 -> bn1; pre-activation (WRN) blocks: conv1 -> bn2 while bn1 comes
    before conv1, and conv2 feeds no batch norm (it keeps its bias). Fused output = unfused output."""
    from virtnet.backbones.registry import BackboneConfig, build_backbone
    from virtnet.nn.adapters import adaptable_convs, conv_bn_pairs, fuse_module, inject_adapters

    torch.manual_seed(0)
    cfg = BackboneConfig(name=backbone, depth=8 if backbone == "resnet" else 10, width=0.25, feature_size=8)
    trunk = build_backbone(cfg, 8)
    inject_adapters(trunk, ["d"], [n for n, _ in adaptable_convs(trunk)], kind="series")
    trunk.eval()
    _randomise_norms(trunk, 1)
    with torch.no_grad():
        for m in trunk.modules():
            if hasattr(m, "adapter"):
                m.adapter.alphas["d"].normal_(0, 0.2)
    fused = fuse_module(trunk, "d").eval()
    x = torch.randn(2, trunk.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fused(x), trunk(x, Route("d")), atol=1e-5)
    pairs = dict(conv_bn_pairs(fused))
    if backbone == "wrn":
        assert pairs["blocks.0.conv1"] == "blocks.0.bn2" and "blocks.0.conv2" not in pairs
        assert fused.get_submodule("blocks.0.conv1").bias is None
        assert fused.get_submodule("blocks.0.conv2").bias is not None  # nothing to absorb it
    else:
        assert pairs["blocks.0.conv1"] == "blocks.0.bn1"
        assert all(m.bias is None for m in fused.modules() if isinstance(m, nn.Conv2d))
