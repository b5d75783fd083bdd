"""Per-task transforms that change the input shape: ``resize`` and ``channels`` (issue 11, scenario M1 of
Deep Elastic Networks: tasks of different input sizes and channels in one multi-task network)."""

from __future__ import annotations

import pytest
import torch

from virtnet import api
from virtnet.api import task_specs
from virtnet.backbones.registry import BackboneConfig, build_multitask
from virtnet.config import validate
from virtnet.data import DataConfig, build_taskset, make_task
from virtnet.data.transforms import (
    BACKGROUND,
    FOREGROUND,
    apply_transforms,
    check_transforms,
    colorize,
    image_colours,
    resize,
    set_channels,
    to_gray,
)
from virtnet.errors import ConfigError


def bad(transforms: list[dict], dataset: str = "digits") -> str:
    with pytest.raises(ConfigError) as e:
        validate(
            DataConfig,
            {"tasks": [{"name": "m1", "dataset": dataset, "transforms": transforms}]},
            "data",
            "run.yaml",
        )
    return str(e.value)


# ---- resize ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 5, 8, 16, 32, 40])
def test_resizing_a_constant_image_gives_the_constant(size: int) -> None:
    x = torch.full((3, 2, 28, 28), 137, dtype=torch.uint8)
    y = resize(x, size)
    assert y.shape == (3, 2, size, size) and y.dtype == torch.uint8
    assert torch.equal(y, torch.full_like(y, 137))


def test_resize_values_by_hand() -> None:
    # 2x2 -> 4x4 bilinear (align_corners=False): a horizontal ramp 0 | 200 becomes 0, 50, 150, 200
    x = torch.tensor([[0, 200], [0, 200]], dtype=torch.uint8).view(1, 1, 2, 2)
    assert resize(x, 4)[0, 0].tolist() == [[0, 50, 150, 200]] * 4
    # 4x4 -> 2x2 with antialias: a triangle filter of twice the width, input pixel centres 0.5 and 1.5 from
    # the output's centre get weight 3/4, the next 1/4 (normalised by 7/4): a row 0 0 70 70 becomes 10 60
    x = torch.tensor([[0, 0, 70, 70]] * 4, dtype=torch.uint8)
    assert resize(x.view(1, 1, 4, 4), 2)[0, 0].tolist() == [[10, 60]] * 2
    # a non-square image becomes square; the same size is the same tensor
    assert resize(torch.zeros(2, 1, 6, 9, dtype=torch.uint8), 5).shape == (2, 1, 5, 5)
    same = torch.randint(0, 256, (2, 3, 7, 7), dtype=torch.uint8)
    assert resize(same, 7) is same
    assert torch.equal(resize(same, 14), resize(same, 14))  # deterministic


# ---- channels --------------------------------------------------------------------------------------------
def test_replicate_gives_three_identical_channels_equal_to_the_input() -> None:
    x = torch.randint(0, 256, (5, 1, 6, 6), dtype=torch.uint8)
    y = set_channels(x, 3, "replicate")
    assert y.shape == (5, 3, 6, 6) and y.is_contiguous()
    for c in range(3):
        assert torch.equal(y[:, c : c + 1], x)
    assert set_channels(y, 3, "replicate") is y  # 3 channels stay as they are
    assert torch.equal(set_channels(x, 1), x)  # count 1 of a gray image: unchanged


def test_count_one_is_the_luma_of_rgb() -> None:
    x = torch.zeros(1, 3, 1, 3, dtype=torch.uint8)
    x[0, 0, 0, 0] = 255  # red
    x[0, 1, 0, 1] = 255  # green
    x[0, 2, 0, 2] = 100  # a dark blue
    y = to_gray(x)
    assert y.shape == (1, 1, 1, 3)
    assert y[0, 0, 0].tolist() == [round(0.299 * 255), round(0.587 * 255), round(0.114 * 100)]
    assert torch.equal(set_channels(x, 1), y)


def test_colorize_by_hand_and_deterministic_for_a_seed() -> None:
    x = torch.zeros(4, 1, 5, 5, dtype=torch.uint8)
    x[:, :, 1:4, 2] = 255  # a white stroke on black
    fg, bg = image_colours(4, seed=7, split="train")
    y = colorize(x, seed=7, split="train")
    assert y.shape == (4, 3, 5, 5) and y.dtype == torch.uint8
    for i in range(4):
        assert y[i, :, 2, 2].tolist() == fg[i].round().int().tolist()  # the stroke: the foreground colour
        assert y[i, :, 0, 0].tolist() == bg[i].round().int().tolist()  # elsewhere: the background colour
    lo, hi = FOREGROUND[0] * 255, FOREGROUND[1] * 255
    assert bool(((fg >= lo) & (fg <= hi)).all()) and bool((bg <= BACKGROUND[1] * 255).all())
    assert not torch.equal(y[:, 0], y[:, 1]) and not torch.equal(y[:, 1], y[:, 2])  # channels differ
    assert len({tuple(c) for c in fg.tolist()}) == 4  # a colour per image
    # the same seed and split: the same images; another seed or split: other colours
    assert torch.equal(colorize(x, seed=7, split="train"), y)
    assert not torch.equal(colorize(x, seed=8, split="train"), y)
    assert not torch.equal(colorize(x, seed=7, split="test"), y)
    # the colour of image i does not depend on how many images follow it
    assert torch.equal(colorize(x[:2], seed=7, split="train"), y[:2])
    # a gray value in between mixes the two colours: bg + (fg - bg) * v / 255
    mid = torch.full((1, 1, 1, 1), 51, dtype=torch.uint8)
    f, b = image_colours(1, seed=1)
    assert colorize(mid, seed=1)[0, :, 0, 0].tolist() == (b + (f - b) * 0.2)[0].round().int().tolist()


# ---- validation ------------------------------------------------------------------------------------------
def test_bad_values_name_the_task_and_key() -> None:
    at = "run.yaml: data.tasks[0].transforms[0]"
    assert bad([{"kind": "resize", "size": 0}]) == f"{at}.size: expected an integer >= 1, got 0"
    assert bad([{"kind": "resize"}]) == f"{at}.size: required for kind resize"
    assert bad([{"kind": "resize", "size": True}]).startswith(f"{at}.size: ")
    assert bad([{"kind": "channels", "count": 2}]) == f"{at}.count: expected 1 or 3, got 2"
    assert bad([{"kind": "channels"}]) == f"{at}.count: required for kind channels (1 or 3)"
    assert bad([{"kind": "channels", "count": 3, "mode": "sepia"}]) == (
        f"{at}.mode: expected one of replicate, colorize, got 'sepia'"
    )
    assert bad([{"kind": "channels", "count": 3, "mode": "colorize"}]) == (
        f"{at}.seed: required for kind channels with mode colorize"
    )
    assert bad([{"kind": "channels", "count": 1, "mode": "colorize", "seed": 1}]) == (
        f"{at}.mode: colorize needs count 3, got count 1"
    )
    assert bad([{"kind": "channels", "count": 3, "seed": 1}]) == (
        f"{at}.seed: not used by kind channels with mode replicate (used by: mode colorize)"
    )
    assert (
        bad([{"kind": "resize", "size": 8, "count": 3}])
        == f"{at}.count: not used by kind resize (used by: channels)"
    )
    assert (
        bad([{"kind": "rotate", "degrees": 10, "size": 3}])
        == f"{at}.size: not used by kind rotate (used by: resize)"
    )
    # the same checks for transforms given to make_task directly
    for spec, key in (
        ({"kind": "resize", "size": 0}, "t[0].size"),
        ({"kind": "channels", "count": 4}, "t[0].count"),
        ({"kind": "channels", "count": 3, "mode": "x"}, "t[0].mode"),
        ({"kind": "channels", "count": 3, "mode": "colorize"}, "t[0].seed"),
    ):
        with pytest.raises(ConfigError) as e:
            check_transforms([spec], "t")
        assert str(e.value).startswith(f"{key}: ")
    # images with neither 1 nor 3 channels cannot take ``channels`` (found when the task is built)
    with pytest.raises(ConfigError, match=r"^data\.tasks\[2\]\.transforms\[0\]: .*1 or 3 channels, got 2$"):
        apply_transforms(
            torch.zeros(1, 2, 4, 4, dtype=torch.uint8),
            check_transforms([{"kind": "channels", "count": 3}], "x"),
            where="data.tasks[2].transforms",
        )


# ---- tasks: shapes and statistics follow the transformed images ------------------------------------------
def m1_cfg() -> dict:
    return {
        "tasks": [
            {
                "name": "rgb16",
                "dataset": "digits",
                "train_size": 60,
                "test_size": 30,
                "val_fraction": 0.25,
                "transforms": [
                    {"kind": "resize", "size": 16},
                    {"kind": "channels", "count": 3, "mode": "colorize", "seed": 3},
                ],
            },
            {"name": "gray8", "dataset": "digits", "train_size": 60, "test_size": 30},
            {
                "name": "rep12",
                "dataset": "digits",
                "train_size": 60,
                "test_size": 30,
                "transforms": [{"kind": "channels", "count": 3}, {"kind": "resize", "size": 12}],
            },
        ]
    }


def test_task_shapes_and_statistics_follow_the_transforms() -> None:
    ts = build_taskset(validate(DataConfig, m1_cfg(), "data"), seed=0)
    rgb, gray, rep = ts["rgb16"], ts["gray8"], ts["rep12"]
    assert rgb.input_shape == (3, 16, 16) and gray.input_shape == (1, 8, 8) and rep.input_shape == (3, 12, 12)
    for t in (rgb, gray, rep):
        for split in (t.train, t.test, *([t.val] if t.val is not None else [])):
            assert split.image_shape == t.input_shape
    assert rgb.val is not None and rgb.val.image_shape == (3, 16, 16)
    # mean / std per channel of the transformed training images
    for t in (rgb, gray, rep):
        x = t.train.images.double() / 255
        assert len(t.mean) == len(t.std) == t.input_shape[0]
        assert t.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist())
        assert t.std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist())
    assert len(set(rgb.mean)) == 3  # colorized channels have their own statistics
    assert rep.mean[0] == rep.mean[1] == rep.mean[2]  # replicated channels the same
    specs = {s.name: s for s in task_specs(ts)}
    assert specs["rgb16"].input_shape == (3, 16, 16) and specs["rgb16"].mean == rgb.mean
    assert specs["gray8"].input_shape == (1, 8, 8)
    assert specs["rep12"].input_shape == (3, 12, 12)
    # deterministic: the same images in another build and under another run seed (colours: transform seed)
    again = build_taskset(validate(DataConfig, m1_cfg(), "data"), seed=0)
    assert torch.equal(again["rgb16"].train.images, rgb.train.images)
    # train and test images are resized and coloured alike (test colours drawn from their own stream)
    assert rgb.test.images.shape[1:] == (3, 16, 16)


def test_make_task_errors_without_a_config_name_the_task() -> None:
    from virtnet.data import ArrayDataset, DatasetSplits

    g = torch.Generator().manual_seed(0)
    split = ArrayDataset(
        torch.randint(0, 256, (8, 2, 4, 4), dtype=torch.uint8, generator=g), torch.arange(8) % 2
    )
    data = DatasetSplits("two_channels", "two channels", split, split, ["a", "b"])
    with pytest.raises(
        ConfigError, match=r"^task 'two': transforms\[0\]: kind channels needs images of 1 or 3"
    ):
        make_task("two", data, transforms=[{"kind": "channels", "count": 3}])
    with pytest.raises(ConfigError, match=r"^task 'two': transforms\[1\]\.size: "):
        make_task("two", data, transforms=[{"kind": "rotate", "degrees": 90}, {"kind": "resize", "size": -1}])


# ---- models: a stem per task maps each input shape to the trunk ------------------------------------------
@pytest.mark.parametrize(
    "model",
    [
        {"name": "resnet", "depth": 8, "width": 0.25},
        {"name": "wrn", "depth": 10, "widen_factor": 1, "width": 0.25},
        {"name": "vgg", "depth": 11, "width": 0.125, "hidden": [16]},
        {"name": "simpleconvnet", "width": 0.25, "hidden": [16, 16]},
    ],
    ids=lambda m: m["name"],
)
def test_stems_take_a_32x32x3_task_next_to_a_28x28x1_task(model: dict) -> None:
    from virtnet.data import load_synthetic

    torch.manual_seed(0)
    gray = load_synthetic(num_classes=3, channels=1, size=28, num_train=12, num_test=6)
    specs_in = [
        {"kind": "resize", "size": 32},
        {"kind": "channels", "count": 3, "mode": "colorize", "seed": 0},
    ]
    rgb = make_task("rgb32", gray, transforms=specs_in)
    plain = make_task("gray28", gray)
    assert rgb.input_shape == (3, 32, 32) and plain.input_shape == (1, 28, 28)
    from virtnet.data.core import TaskSet

    specs = task_specs(TaskSet([rgb, plain], "m1"))
    net = build_multitask(validate(BackboneConfig, model, "model"), specs)
    outs = []
    for t in (rgb, plain):
        x = torch.randn(2, *t.input_shape)
        y = net(x, t.name)
        assert y.shape == (2, 3)
        outs.append(y)
    sum(o.square().sum() for o in outs).backward()
    for t in (rgb, plain):
        stem = net.stem(t.name)
        grads = [p.grad for p in stem.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ---- end to end: one training step through virtnet.api.train --------------------------------------------
def mixed_run_cfg(tmp_path, method: str) -> dict:
    return {
        "seed": 0,
        "output_dir": str(tmp_path / method),
        "data": {
            "tasks": [
                {
                    "name": "rgb16",
                    "dataset": "digits",
                    "train_size": 40,
                    "test_size": 20,
                    "transforms": [
                        {"kind": "resize", "size": 16},
                        {"kind": "channels", "count": 3, "mode": "colorize", "seed": 1},
                    ],
                },
                {"name": "gray8", "dataset": "digits", "train_size": 40, "test_size": 20},
            ]
        },
        "model": {"name": "resnet", "depth": 8, "width": 0.25},
        "method": {"name": method},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "max_steps_per_epoch": 1, "progress": False},
    }


@pytest.mark.parametrize("method", ["joint", "dvn"])
def test_one_step_of_a_two_task_model_with_mixed_inputs(tmp_path, method: str) -> None:
    run = api.train(mixed_run_cfg(tmp_path, method))
    assert run.model.spec("rgb16").input_shape == (3, 16, 16)
    assert run.model.spec("gray8").input_shape == (1, 8, 8)
    assert run.model.spec("rgb16").mean == run.taskset["rgb16"].mean
    run.model.eval()
    with torch.no_grad():
        for name, shape in (("rgb16", (3, 16, 16)), ("gray8", (1, 8, 8))):
            y = run.model(torch.randn(2, *shape), name)
            assert y.shape == (2, 10) and bool(torch.isfinite(y).all())
    loaded = api.load(run.out_dir / "model.json")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, "rgb16"), run.model(x, "rgb16"))
