"""Backbones: every registered trunk through MultiTaskNet (shapes, gradients, unit routes), exact parameter
counts against hand arithmetic, unit-slicing consistency (residual sums, the flatten of SimpleConvNet),
config errors and seeded determinism."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from virtnet.backbones import (
    VGG,
    Backbone,
    BackboneConfig,
    MultiTaskNet,
    ResNet,
    ResNet26,
    SimpleConvNet,
    Stem,
    TaskSpec,
    WideResNet,
    backbone_names,
    build_backbone,
    build_multitask,
    default_feature_size,
    get_backbone_class,
    scale_width,
)
from virtnet.config import validate
from virtnet.errors import ConfigError
from virtnet.nn import BatchNorm1d, BatchNorm2d, Conv2d, Linear, Route, UnitPartition

SPECS = [
    TaskSpec("mnist", 1, 28, 10),
    TaskSpec("cifar", 3, 32, 100),
    TaskSpec("tiny", 3, 64, 200),
    TaskSpec("stl", 3, 96, 10),
]

# small configs for shape coverage; a backbone missing here is still tested with {"width": 0.25}
SMALL: dict[str, dict[str, Any]] = {
    "resnet": {"depth": 8},
    "wrn": {"depth": 10, "widen_factor": 1},
    "vgg": {"hidden": [16]},
    "simpleconvnet": {},
    "resnet26": {},
}
CASES = [(name, {"name": name, "width": 0.25, **SMALL.get(name, {})}) for name in backbone_names()]
CASES.append(("resnet-imagenet", {"name": "resnet", "layout": "imagenet", "depth": 10, "width": 0.125}))
IDS = [c[0] for c in CASES]


def small_model(cfg: dict[str, Any], seed: int = 0) -> MultiTaskNet:
    torch.manual_seed(seed)
    return build_multitask(validate(BackboneConfig, cfg), SPECS)


def batch(spec: TaskSpec, n: int = 2) -> torch.Tensor:
    return torch.randn(n, spec.in_channels, spec.input_size, spec.input_size)


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_and_classes() -> None:
    assert backbone_names() == ["resnet", "wrn", "vgg", "simpleconvnet", "resnet26"]
    for name in backbone_names():
        assert issubclass(get_backbone_class(name), Backbone)
    with pytest.raises(ConfigError, match="unknown backbone 'alexnet'"):
        get_backbone_class("alexnet")


def test_default_feature_size() -> None:
    assert default_feature_size(SPECS) == 28
    assert default_feature_size([TaskSpec("tiny", 3, 4, 2)]) == 8
    with pytest.raises(ConfigError, match="at least one task"):
        default_feature_size([])


# ---------------------------------------------------------------------- every backbone through MultiTaskNet


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_forward_backward(name: str, cfg: dict[str, Any]) -> None:
    model = small_model(cfg)
    trunk = model.trunk
    assert trunk.input_size == 28
    loss = torch.zeros(())
    for spec in SPECS:
        x = batch(spec)
        model.check_input(x, spec.name)
        h = model.stem(spec.name)(x)
        assert h.shape == (2, trunk.in_channels, trunk.input_size, trunk.input_size)
        f = model.features(x, spec.name)
        assert f.shape == (2, trunk.feature_channels)
        out = model(x, spec.name)
        assert out.shape == (2, spec.num_outputs)
        assert torch.isfinite(out).all()
        loss = loss + out.square().mean()
    loss.backward()
    for pname, p in trunk.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    for spec in SPECS:  # each task's stem and head learn too
        for p in [*model.stem(spec.name).parameters(), *model.heads[spec.name].parameters()]:
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_unit_routes(name: str, cfg: dict[str, Any]) -> None:
    model = small_model(cfg)
    randomise_bn(model)
    model.eval()
    in_part, feat_part = model.set_units(2)
    assert in_part.channels == model.trunk.in_channels
    assert feat_part.channels == model.trunk.feature_channels
    with torch.no_grad():
        for spec in SPECS:
            x = batch(spec)
            dense_f = model.features(x, spec.name)
            dense = model(x, spec.name)
            for units in [(0,), (1,), (0, 1)]:
                route = Route(spec.name, units)
                h = model.stem(spec.name)(x, route)
                assert h.shape[1] == in_part.size(units)
                f = model.features(x, spec.name, route)
                assert f.shape == (2, feat_part.size(units))
                out = model(x, spec.name, route)
                assert out.shape == (2, spec.num_outputs)
                assert torch.isfinite(out).all()
            # all units run the dense network, exactly
            assert torch.equal(model.features(x, spec.name, Route(spec.name, (0, 1))), dense_f)
            assert torch.equal(model(x, spec.name, Route(spec.name, (0, 1))), dense)


@pytest.mark.parametrize("ratios", [None, [1.0, 2.0, 1.0]], ids=["equal", "1:2:1"])
@pytest.mark.parametrize("units", [(1,), (0, 2)])
@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_routed_trunk_equals_block_diagonal_dense(
    name: str, cfg: dict[str, Any], units: tuple[int, ...], ratios: list[float] | None
) -> None:
    """With every cross-unit weight zeroed, the dense trunk's features of ``units`` equal the routed
    (physically narrower) trunk's: the shortcut and main path of every residual sum, and every flatten,
    follow the same channel partition."""
    torch.manual_seed(1)
    trunk = build_backbone(validate(BackboneConfig, cfg), 40)
    randomise_bn(trunk)
    trunk.eval()
    in_part, feat_part = trunk.set_units(3, ratios)
    with torch.no_grad():
        for _, m in trunk.sliceable_layers():
            if isinstance(m, (Conv2d, Linear)) and m.in_partition is not None and m.out_partition is not None:
                out_unit = torch.repeat_interleave(torch.arange(3), torch.tensor(m.out_partition.sizes))
                in_unit = torch.repeat_interleave(torch.arange(3), torch.tensor(m.in_partition.sizes))
                mask = (out_unit[:, None] == in_unit[None, :]).to(m.weight.dtype)
                m.weight.mul_(mask.view(*mask.shape, *([1] * (m.weight.dim() - 2))))
        x = torch.randn(2, trunk.in_channels, 40, 40)
        dense = trunk(x)[:, feat_part.indices(units)]
        routed = trunk(x[:, in_part.indices(units)], Route("t", units))
    torch.testing.assert_close(routed, dense, rtol=1e-4, atol=1e-5)


def test_too_many_units_is_config_error() -> None:
    model = small_model({"name": "resnet", "depth": 8, "width": 0.25})  # 4-channel layers
    with pytest.raises(ConfigError, match="5 units do not fit"):
        model.set_units(5)


# ----------------------------------------------------------------------- SimpleConvNet's flatten, by hand


def test_simpleconvnet_flatten_partition_by_hand() -> None:
    """A routed forward on a subset of units equals a hand-built narrower computation; FC1's input unit
    ``u`` is ``[offset_u * HW, (offset_u + size_u) * HW)`` of the channel-major flatten."""
    torch.manual_seed(0)
    trunk = SimpleConvNet(width=0.25, input_size=48, hidden=[12, 9])  # 8 channels, 48->24->12->6->3
    randomise_bn(trunk)
    trunk.eval()
    trunk.set_units(3)
    area = 3 * 3
    assert trunk.output_size == 3 and trunk.fc1.in_features == 8 * area
    conv_part = UnitPartition.split(8, 3)
    assert conv_part.sizes == (3, 3, 2)  # not proportional to an equal split of the 72 features (24 each)
    assert trunk.fc1.in_partition is not None
    assert trunk.fc1.in_partition.sizes == (3 * area, 3 * area, 2 * area)
    units = (0, 2)
    ci = torch.tensor([0, 1, 2, 6, 7])  # conv channels of units 0 and 2
    assert torch.equal(conv_part.indices(units), ci)
    fi = torch.cat([torch.arange(0 * area, 3 * area), torch.arange(6 * area, 8 * area)])  # features by hand
    h1 = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])  # FC1: 12 = 4 + 4 + 4
    h2 = torch.tensor([0, 1, 2, 6, 7, 8])  # FC2: 9 = 3 + 3 + 3
    x = torch.randn(3, 8, 48, 48)
    with torch.no_grad():
        h = F.max_pool2d(x[:, ci], 2)  # the stem's pool
        for block in [m for m in trunk.blocks if not isinstance(m, nn.MaxPool2d)]:
            conv, bn = block[0], block[1]
            h = F.conv2d(h, conv.weight[ci][:, ci], padding=1)
            h = F.batch_norm(
                h, bn.running_mean[ci], bn.running_var[ci], bn.weight[ci], bn.bias[ci], False, 0.0, bn.eps
            )
            h = F.max_pool2d(F.relu(h), 2)
        h = h.flatten(1)  # (B, 4 * 9)
        h = F.relu(F.linear(h, trunk.fc1.weight[h1][:, fi], trunk.fc1.bias[h1]))
        expected = F.relu(F.linear(h, trunk.fc2.weight[h2][:, h1], trunk.fc2.bias[h2]))
        got = trunk(x[:, ci], Route("t", units))
    assert got.shape == (3, len(h2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- exact parameter counts


def conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k  # bias-free


def bn(c: int) -> int:
    return 2 * c  # weight + bias


def test_resnet20_cifar_count() -> None:
    # stage 1: 3 blocks 16->16, two 3x3 convs + two BN each
    s1 = 3 * (2 * conv(16, 16) + 2 * bn(16))  # 3 * (4608 + 64) = 14016
    # stage 2: first block 16->32 (stride 2) with 1x1 projection + BN, then two blocks 32->32
    s2 = conv(16, 32) + conv(32, 32) + 2 * bn(32) + conv(16, 32, 1) + bn(32)  # 14528
    s2 += 2 * (2 * conv(32, 32) + 2 * bn(32))  # + 37120
    s3 = conv(32, 64) + conv(64, 64) + 2 * bn(64) + conv(32, 64, 1) + bn(64)  # 57728
    s3 += 2 * (2 * conv(64, 64) + 2 * bn(64))  # + 147968
    assert s1 + s2 + s3 == 271360
    assert n_params(ResNet(depth=20)) == 271360
    model = MultiTaskNet(ResNet(depth=20), [TaskSpec("cifar10", 3, 32, 10)])
    assert n_params(model.stems["cifar10"]) == conv(3, 16) + bn(16)  # 464
    assert n_params(model.heads["cifar10"]) == 64 * 10 + 10


def test_resnet18_imagenet_count() -> None:
    widths, counts, total, prev = (64, 128, 256, 512), (2, 2, 2, 2), 0, 64
    for i, (c, n) in enumerate(zip(widths, counts, strict=True)):
        for j in range(n):
            cin = prev if j == 0 else c
            total += conv(cin, c) + conv(c, c) + 2 * bn(c)
            if j == 0 and i > 0:
                total += conv(cin, c, 1) + bn(c)
        prev = c
    # torchvision's resnet18 (11,689,512) less conv1 (9,408), bn1 (128) and fc (513,000)
    assert total == 11_689_512 - 9408 - 128 - 513_000 == 11_166_976
    assert n_params(ResNet(depth=18, layout="imagenet")) == total
    stem = ResNet(depth=10, layout="imagenet", width=0.125).make_stem(3, 64)
    assert n_params(stem) == conv(3, 8, 7) + bn(8)


def test_wrn_10_1_count() -> None:
    s1 = bn(16) + conv(16, 16) + bn(16) + conv(16, 16)  # 16 -> 16: identity shortcut, 4672
    s2 = bn(16) + conv(16, 32) + bn(32) + conv(32, 32) + conv(16, 32, 1)  # 1x1 shortcut, 14432
    s3 = bn(32) + conv(32, 64) + bn(64) + conv(64, 64) + conv(32, 64, 1)  # 57536
    final = bn(64)
    assert s1 + s2 + s3 + final == 76768
    assert n_params(WideResNet(depth=10, widen_factor=1)) == 76768
    assert n_params(WideResNet(depth=10, widen_factor=1).make_stem(3, 32)) == conv(3, 16)  # conv only
    # WRN-32-4 (DVN's counting, 5 blocks per stage) and WRN-16-4 (2 blocks per stage)
    assert WideResNet(depth=32).blocks_per_stage == 5 and WideResNet(depth=16).blocks_per_stage == 2


def test_vgg11_count() -> None:
    # the stem holds conv 3->64; trunk: 64->128, 128->256, 256->256, 256->512, 512->512 x 3
    convs = [(64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    trunk = sum(conv(a, b) + bn(b) for a, b in convs)  # 9,221,376
    hidden = 512 * 512 + bn(512)  # bias-free Linear + BatchNorm1d: 263,168
    assert trunk + hidden == 9_484_544
    assert n_params(VGG(depth=11, input_size=32)) == 9_484_544
    assert n_params(VGG(depth=11, hidden=[])) == trunk
    assert VGG(depth=11, input_size=32).output_size == 1  # 32 -> 16 -> 8 -> 4 -> 2 -> 1
    assert VGG(depth=11, input_size=28).output_size == 1  # 28 -> 14 -> 7 -> 3 -> 1, last pool skipped


def test_simpleconvnet_count() -> None:
    # Mini-ImageNet at 84x84: 84 -> 42 -> 21 -> 10 -> 5, flatten 32 * 5 * 5 = 800
    convs = 3 * (conv(32, 32) + bn(32))  # 27,840
    fcs = (800 * 128 + 128) + (128 * 128 + 128)  # 102,528 + 16,512
    assert convs + fcs == 146_880
    net = SimpleConvNet()
    assert n_params(net) == 146_880 and net.feature_channels == 128
    model = MultiTaskNet(net, [TaskSpec("mini", 3, 84, 5)])
    assert n_params(model.stems["mini"]) == conv(3, 32) + bn(32)  # 928
    assert n_params(model) == 146_880 + 928 + (128 * 5 + 5)  # 148,453: the paper's "0.14M"


def test_resnet26_count() -> None:
    total, prev = 0, 32
    for c in (64, 128, 256):  # each stage: first block stride 2 with avg-pool + 1x1 projection + BN
        total += conv(prev, c) + conv(c, c) + 2 * bn(c) + conv(prev, c, 1) + bn(c)
        total += 3 * (2 * conv(c, c) + 2 * bn(c))
        prev = c
    total += bn(256)  # final BN-ReLU
    assert total == 5_857_664
    trunk = ResNet26()
    assert n_params(trunk) == total
    assert n_params(trunk.make_stem(3, 64)) == conv(3, 32) + bn(32)
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 + 1 == 26  # 24 trunk convs + stem conv + classifier
    assert trunk.blocks(torch.zeros(1, 32, 64, 64)).shape == (1, 256, 8, 8)


def test_width_multiplier() -> None:
    assert scale_width(16, 0.5) == 8 and scale_width(16, 0.01) == 1 and scale_width(10, 0.25) == 2
    assert ResNet(depth=20, width=0.5).widths == (8, 16, 32)
    assert WideResNet(depth=16, widen_factor=4, width=0.5).widths == (8, 32, 64, 128)
    assert ResNet26(width=2.0).feature_channels == 512
    assert ResNet(depth=20, widths=[8, 24, 40]).feature_channels == 40


# -------------------------------------------------------------------------------------------------- stems


@pytest.mark.parametrize(
    ("kwargs", "size", "target", "conv_stride", "has_max_pool"),
    [
        ({}, 28, 28, 1, False),
        ({}, 32, 28, 1, False),
        ({}, 64, 28, 2, False),
        ({}, 96, 28, 3, False),
        ({}, 16, 28, 1, False),  # upsampled first
        ({"kernel": 7, "max_pool": True}, 224, 56, 2, True),
        ({"kernel": 7, "max_pool": True}, 64, 16, 2, True),
        ({"kernel": 7, "max_pool": True}, 96, 16, 3, True),
        ({"kernel": 7, "max_pool": True}, 32, 16, 2, False),  # too small for stride 4: no max-pool
        ({"kernel": 7, "max_pool": True}, 8, 16, 1, False),
    ],
)
def test_stem_strides(
    kwargs: dict[str, Any], size: int, target: int, conv_stride: int, has_max_pool: bool
) -> None:
    stem = Stem(3, size, 8, target, **kwargs)
    assert stem.conv.stride == (conv_stride, conv_stride)
    assert (stem.max_pool is not None) == has_max_pool
    assert stem(torch.randn(2, 3, size, size)).shape == (2, 8, target, target)


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "resnet", "depth": 21}, "depth: ResNet CIFAR depth must be 6n+2 (20, 32, 44, ...), got 21"),
        (
            {"name": "resnet", "layout": "imagenet", "depth": 20},
            "depth: ResNet ImageNet depth must be one of 10, 18, 34, 42, got 20",
        ),
        ({"name": "wrn", "depth": 12}, "depth: WRN depth must be 6m+4"),
        ({"name": "vgg", "depth": 12}, "depth: VGG depth must be one of 11, 13, 16, 19, got 12"),
        ({"name": "simpleconvnet", "depth": 4}, "depth: simpleconvnet has a fixed layout"),
        ({"name": "resnet26", "depth": 20}, "depth: resnet26 has a fixed depth of 26"),
        ({"width": 0}, "width: Input should be greater than 0"),
        ({"width": -1.5}, "width: Input should be greater than 0"),
        ({"dpeth": 20}, "dpeth: unknown key"),
        ({"name": "alexnet"}, "name: Input should be"),
        ({"name": "vgg", "layout": "imagenet"}, "layout: only resnet has an imagenet layout, got it for vgg"),
        ({"name": "resnet", "hidden": [64]}, "hidden: only simpleconvnet and vgg have hidden FC layers"),
        ({"name": "simpleconvnet", "hidden": [64, 32, 16]}, "hidden: simpleconvnet has two hidden FC layers"),
        ({"hidden": [0]}, "hidden[0]: Input should be greater than 0"),
        ({"widen_factor": 0}, "widen_factor: Input should be greater than or equal to 1"),
        ({"dropout": 1.0}, "dropout: Input should be less than 1"),
        ({"feature_size": 0}, "feature_size: Input should be greater than or equal to 1"),
        ({"init": "orthogonal"}, "init: Input should be 'kaiming' or 'xavier'"),
    ],
)
def test_config_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(BackboneConfig, data)
    assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(ConfigError, match=r"^run\.yaml: model\."):
        validate(BackboneConfig, data, where="model", source="run.yaml")


def test_config_defaults_and_assignment() -> None:
    cfg = validate(BackboneConfig, {})
    assert cfg.model_dump() == {
        "name": "resnet",
        "layout": "cifar",
        "depth": None,
        "width": 1.0,
        "widen_factor": 4,
        "feature_size": None,
        "dropout": 0.0,
        "hidden": None,
        "init": "kaiming",
    }
    cfg = validate(BackboneConfig, {"name": "resnet", "depth": 20})
    with pytest.raises(ValidationError, match="depth: VGG depth must be one of"):
        cfg.name = "vgg"  # re-checked on assignment


def test_constructor_errors() -> None:
    with pytest.raises(ConfigError, match=r"^depth: ResNet CIFAR depth must be 6n\+2"):
        ResNet(depth=21)
    with pytest.raises(ConfigError, match="^layout:"):
        ResNet(layout="mobile")
    with pytest.raises(ConfigError, match="^width:"):
        WideResNet(width=0)
    with pytest.raises(ConfigError, match="^widths:"):
        ResNet26(widths=[32, 64])
    with pytest.raises(ConfigError, match="^depth:"):
        VGG(depth=12)
    with pytest.raises(ConfigError, match="^hidden:"):
        SimpleConvNet(hidden=[10])
    with pytest.raises(ConfigError, match="^feature_size:"):
        build_backbone(BackboneConfig(), 0)
    with pytest.raises(ConfigError, match="^tasks: task names must be unique"):
        build_multitask(BackboneConfig(depth=8, width=0.25), [SPECS[0], SPECS[0]])


# ---------------------------------------------------------------------------------- init and determinism


@pytest.mark.parametrize(("name", "cfg"), CASES, ids=IDS)
def test_seeded_construction_is_deterministic(name: str, cfg: dict[str, Any]) -> None:
    a, b = small_model(cfg, seed=3).state_dict(), small_model(cfg, seed=3).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = small_model(cfg, seed=4).state_dict()
    assert any(not torch.equal(a[k], v) for k, v in c.items())


def test_init_schemes() -> None:
    model = small_model({"name": "vgg", "width": 0.25, "hidden": [16], "init": "xavier"})
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            assert m.weight.abs().max() <= (6.0 / (fan_in + fan_out)) ** 0.5 + 1e-6
        if isinstance(m, (BatchNorm1d, BatchNorm2d)):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
