"""virtnet.cost: parameter/buffer/byte counts, FLOPs, latency, reports and plots on tiny networks whose
counts are written out by hand."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import namedtuple

import pytest
import safetensors.torch
import torch
from torch import nn

from virtnet.cost import (
    bytes_on_disk,
    check_rows,
    cost_of,
    count_buffers,
    count_flops,
    count_parameters,
    density,
    flop_counts,
    latency_profile,
    level_costs,
    machine_info,
    make_row,
    markdown_table,
    measure_interleaved,
    measure_latency,
    parameter_breakdown,
    plot_accuracy_vs_density,
    plot_error_matrix,
    tensor_bytes,
    write_report,
)
from virtnet.errors import ConfigError, DataError

FAST = {"warmup": 1, "repeats": 3}


def tiny_net() -> nn.Sequential:
    """Conv2d(3, 4, 3, padding=1) + BN(4) + ReLU + global pool + Linear(4, 2)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


# conv weight + conv bias + BN weight + BN bias + linear weight + linear bias
TINY_PARAMS = 3 * 4 * 9 + 4 + 4 + 4 + 4 * 2 + 2  # = 130
# BN running_mean + running_var + num_batches_tracked
TINY_BUFFERS = 4 + 4 + 1


class TinyTaskNet(nn.Module):
    """stem -> trunk -> head with TaskNet's parameter names; forward accepts an (ignored) route."""

    def __init__(self, width: int = 8, outputs: int = 5, trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.trunk = trunk or nn.Sequential(
            nn.Conv2d(4, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor, route: object = None) -> torch.Tensor:
        return self.head(self.trunk(self.stem(x)))


STEM_PARAMS = 3 * 4 * 9 + 4 + 4  # conv (no bias) + BN affine = 116
TRUNK_PARAMS = 4 * 8 * 9 + 8 + 8  # = 304
HEAD_PARAMS = 8 * 5 + 5  # = 45


# ---- parameters, buffers, bytes ------------------------------------------------------------------------
def test_count_parameters_by_hand():
    net = tiny_net()
    assert TINY_PARAMS == 130
    assert count_parameters(net) == TINY_PARAMS
    # frozen parameters count too
    for p in net[0].parameters():
        p.requires_grad_(False)
    assert count_parameters(net) == TINY_PARAMS
    assert count_buffers(net) == TINY_BUFFERS


def test_shared_tensors_counted_once():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
    b.weight = a.weight  # tied
    assert count_parameters(nn.Sequential(a, b)) == 4 * 4 + 4

    # two task networks over one trunk: the multi-task total counts the trunk once
    t1 = TinyTaskNet()
    t2 = TinyTaskNet(trunk=t1.trunk)
    assert count_parameters([t1, t2]) == 2 * STEM_PARAMS + TRUNK_PARAMS + 2 * HEAD_PARAMS
    assert count_parameters(nn.ModuleList([t1, t2])) == 2 * STEM_PARAMS + TRUNK_PARAMS + 2 * HEAD_PARAMS


def test_parameter_breakdown_by_prefix():
    net = TinyTaskNet()
    bd = parameter_breakdown(net)
    assert bd == {
        "shared": TRUNK_PARAMS,
        "task_specific": STEM_PARAMS + HEAD_PARAMS,
        "total": STEM_PARAMS + TRUNK_PARAMS + HEAD_PARAMS,
    }
    bd2 = parameter_breakdown(net, shared_prefixes=("trunk.", "stem."))
    assert bd2["shared"] == TRUNK_PARAMS + STEM_PARAMS and bd2["task_specific"] == HEAD_PARAMS
    assert parameter_breakdown(net, shared_prefixes=())["shared"] == 0
    # BN running statistics are buffers: 4 + 4 + 1 (stem) and 8 + 8 + 1 (trunk)
    assert count_buffers(net) == 9 + 17


def test_density():
    assert density(50, 200) == 0.25
    with pytest.raises(ConfigError):
        density(1, 0)


def test_bytes_on_disk_and_tensor_bytes():
    net = tiny_net()
    raw = (TINY_PARAMS + 8) * 4 + 8  # float32 params and running stats, int64 num_batches_tracked
    assert tensor_bytes(net) == raw
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    assert bytes_on_disk(net) == len(safetensors.torch.save(sd))
    assert bytes_on_disk(net) >= raw


def test_bytes_on_disk_shared_and_non_contiguous():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3, bias=False)
    b.weight = a.weight
    c = nn.Linear(3, 4, bias=False)
    c.weight = nn.Parameter(torch.randn(3, 4).t())  # non-contiguous (4, 3) view
    assert not c.weight.is_contiguous()
    m = nn.Sequential(a, b, c)
    n = bytes_on_disk(m)  # does not raise
    assert n >= tensor_bytes(m) == (12 + 3 + 12) * 4
    assert c.weight.stride() == (1, 4)  # the module is untouched


# ---- FLOPs -----------------------------------------------------------------------------------------------
def test_count_flops_by_hand():
    net = tiny_net()
    conv = 2 * 3 * 4 * 3 * 3 * 8 * 8  # 2 * Cin * Cout * k * k * Ho * Wo (bias, BN, ReLU, pool: 0)
    linear = 2 * 4 * 2  # 2 * in * out (bias: 0)
    assert count_flops(net, (3, 8, 8)) == conv + linear == 13840
    assert count_flops(net, (3, 8, 8), batch_size=2) == 2 * (conv + linear)
    assert flop_counts(net, (3, 8, 8)) == {"aten.convolution": conv, "aten.addmm": linear}


def test_count_flops_tasknet_strided():
    net = TinyTaskNet()
    stem = 2 * 3 * 4 * 9 * 16 * 16
    trunk = 2 * 4 * 8 * 9 * 8 * 8  # stride 2: 16x16 -> 8x8
    head = 2 * 8 * 5
    assert count_flops(net, (3, 16, 16)) == stem + trunk + head


def test_count_flops_restores_flags_and_rejects_bad_input():
    net = tiny_net().train()
    net[1].eval()  # a frozen BN inside a training network
    before = [m.training for m in net.modules()]
    count_flops(net, (3, 8, 8))
    assert [m.training for m in net.modules()] == before
    assert net[1].running_mean.abs().sum() == 0  # eval mode: running stats untouched
    with pytest.raises(DataError, match="shape"):
        count_flops(net, (5, 8, 8))
    with pytest.raises(ConfigError):
        count_flops(net, (3, 0, 8))
    with pytest.raises(ConfigError):
        count_flops(net, (3, 8, 8), batch_size=0)


# ---- latency ---------------------------------------------------------------------------------------------
def test_measure_latency_restores_threads_flags_and_layout():
    net = TinyTaskNet().train()
    net.stem[1].eval()
    flags = [m.training for m in net.modules()]
    w = net.stem[0].weight
    ptr, stride = w.data_ptr(), w.stride()
    old_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for fmt in ("nchw", "channels_last"):
            r = measure_latency(net, (3, 16, 16), 2, threads=2, memory_format=fmt, keep_times=True, **FAST)
            assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["threads"] == 2 and r["memory_format"] == fmt and len(r["times_ms"]) == 3
            assert torch.get_num_threads() == 1
        assert net.stem[0].weight is w and w.data_ptr() == ptr and w.stride() == stride
        assert w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
        assert [m.training for m in net.modules()] == flags
    finally:
        torch.set_num_threads(old_threads)
    with pytest.raises(ConfigError):
        measure_latency(net, (3, 16, 16), memory_format="nhwc")


def test_measure_latency_keeps_channels_last_module():
    net = tiny_net()
    net = net.to(memory_format=torch.channels_last)
    w = net[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last)
    measure_latency(net, (3, 8, 8), 1, memory_format="nchw", **FAST)
    assert net[0].weight is w and w.is_contiguous(memory_format=torch.channels_last)


def test_latency_profile_both_formats_and_batches():
    net = tiny_net()
    old = torch.get_num_threads()
    prof = latency_profile(net, (3, 8, 8), batch_sizes=(1, 4), threads=2, **FAST)
    assert torch.get_num_threads() == old
    assert set(prof["batches"]) == {1, 4}
    for entry in prof["batches"].values():
        for fmt in ("nchw", "channels_last"):
            assert entry[fmt]["median_ms"] > 0
        assert entry["best_format"] in ("nchw", "channels_last")
        assert entry["best_ms"] == min(entry["nchw"]["median_ms"], entry["channels_last"]["median_ms"])
    # non-image inputs: layout is meaningless, one format measured
    mlp = nn.Sequential(nn.Linear(6, 3))
    prof = latency_profile(mlp, (6,), batch_sizes=(1,), **FAST)
    assert prof["batches"][1]["best_format"] == "nchw"


class _Recorder(nn.Module):
    """A conv that appends its name to a shared log on every call (the interleaving order)."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return self.conv(x)


def test_measure_interleaved_calls_in_turn_and_restores_state():
    log: list[str] = []
    a, b, c = (_Recorder(n, log) for n in "abc")
    b.train()
    w = b.conv.weight
    old = torch.get_num_threads()
    r = measure_interleaved({"a": a, "b": b, "c": c}, (3, 8, 8), 2, threads=1, warmup=1, repeats=4)
    # warm-up: one call each; then turn i starts at module i mod 3 (a b c, b c a, c a b, a b c)
    assert "".join(log) == "abc" + "abc" + "bca" + "cab" + "abc"
    assert set(r["median_ms"]) == {"a", "b", "c"} and all(v > 0 for v in r["median_ms"].values())
    assert set(r["ratio"]) == {(x, y) for x in "abc" for y in "abc" if x != y}
    assert r["repeats"] == 4 and r["threads"] == 1 and isinstance(r["contended"], bool)
    assert torch.get_num_threads() == old
    assert b.training and b.conv.weight is w and w.is_contiguous()
    with pytest.raises(ConfigError, match="at least one module"):
        measure_interleaved({}, (3, 8, 8))
    with pytest.raises(ConfigError, match="repeats"):
        measure_interleaved({"a": a}, (3, 8, 8), repeats=0)


# ---- reports -------------------------------------------------------------------------------------------
def schema_problems(d: object) -> list[str]:
    """The checks of the shared results checker (check_results.py), re-implemented."""
    if not isinstance(d, dict):
        return ["top level is not an object"]
    problems = [f"missing top-level '{k}'" for k in ("command", "seed", "rows") if k not in d]
    rows = d.get("rows")
    if not isinstance(rows, list) or not rows:
        return problems + ["'rows' is not a non-empty list"]
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            problems.append(f"row {i} is not an object")
            continue
        problems += [
            f"row {i} lacks '{k}'" for k in ("method", "scenario", "task", "accuracy", "params") if k not in r
        ]
        if "level" not in r and "budget" not in r:
            problems.append(f"row {i} has neither 'level' nor 'budget'")
        a = r.get("accuracy")
        if a is not None and not (isinstance(a, (int, float)) and 0 <= a <= 100):
            problems.append(f"row {i} accuracy {a!r} out of range")
    return problems


def test_cost_of_keys_and_values():
    net = TinyTaskNet()
    before = [m.training for m in net.modules()]
    c = cost_of(net, (3, 16, 16), batch_sizes=(1, 4), full_params=2 * 465, **FAST)
    assert c["params"] == STEM_PARAMS + TRUNK_PARAMS + HEAD_PARAMS == 465
    assert c["shared_params"] == TRUNK_PARAMS and c["task_params"] == STEM_PARAMS + HEAD_PARAMS
    assert c["flops"] == count_flops(net, (3, 16, 16)) and c["density"] == 0.5
    assert c["bytes"] == bytes_on_disk(net) and c["tensor_bytes"] == tensor_bytes(net)
    for b in (1, 4):
        assert c[f"latency_ms_b{b}"] == min(c[f"latency_ms_b{b}_nchw"], c[f"latency_ms_b{b}_channels_last"])
        assert c[f"format_b{b}"] in ("nchw", "channels_last")
    assert [m.training for m in net.modules()] == before
    c2 = cost_of(net, (3, 16, 16), latency=False)
    assert not any(k.startswith(("latency", "format")) for k in c2) and "density" not in c2


def test_level_costs_with_a_method():
    Level = namedtuple("Level", "index name")

    class TwoWidths:
        name = "toy"

        def levels(self, model, task):
            return [Level(1, "half"), Level(2, "full")]

        def export(self, model, task, level):
            return TinyTaskNet(width=4 if level == 1 else 8)

        def shared_prefixes(self):
            return ("trunk.",)

    rows = level_costs(TwoWidths(), None, "t", (3, 16, 16), latency=False)
    half = STEM_PARAMS + (4 * 4 * 9 + 4 + 4) + (4 * 5 + 5)
    assert [r["params"] for r in rows] == [half, 465]
    assert rows[0]["density"] == half / 465 and rows[1]["density"] == 1.0
    assert rows[0]["level"] == 1 and rows[0]["level_name"] == "half" and rows[0]["method"] == "toy"


def test_write_report_three_files(tmp_path):
    net = tiny_net()
    c = cost_of(net, (3, 8, 8), batch_sizes=(1,), **FAST)
    rows = [
        make_row("joint", "cifar", "t1", 1, 91.234567, c, density=1.0),
        make_row("joint", "cifar", "t2", 1, None, c, density=1.0),
        {
            "method": "packnet",
            "scenario": "cifar",
            "task": "t1",
            "budget": 0.5,
            "accuracy": 88.0,
            "params": 1234567,
            "flops": 2.5e6,
        },
    ]
    meta = {"command": "virtnet bench --config x.yaml", "seed": 0, "note": "tiny"}
    paths = write_report(rows, tmp_path / "sub" / "report", meta)
    assert set(paths) == {"json", "csv", "md"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0 and p.stem == "report"

    doc = json.loads(paths["json"].read_text())
    assert schema_problems(doc) == []
    assert doc["command"] == meta["command"] and doc["seed"] == 0 and doc["note"] == "tiny"
    assert isinstance(doc["machine"], dict) and doc["machine"]["cores"] >= 1
    assert doc["rows"][0]["accuracy"] == 91.234567 and doc["rows"][0]["params"] == TINY_PARAMS  # raw

    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and table[0]["params"] == str(TINY_PARAMS) and table[1]["accuracy"] == ""

    md = paths["md"].read_text()
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(rows)  # header, separator, one line per row
    header = table_lines[0]
    for h in ("params", "FLOPs (2 per MAC)", "latency b1 (ms)", "accuracy (%)", "density (%)"):
        assert h in header
    assert "91.23" in md and "1,234,567" in md and "| 100.0 |" in md
    assert "- command: `virtnet bench --config x.yaml`" in md and "- seed: 0" in md and "- machine: " in md


def test_check_rows_rejects_bad_rows(tmp_path):
    good = {
        "method": "m",
        "scenario": "s",
        "task": "t",
        "level": 1,
        "accuracy": 50.0,
        "params": 1,
        "flops": 2,
    }
    check_rows([good])
    for bad in (
        [],
        [{k: v for k, v in good.items() if k != "level"}],
        [{k: v for k, v in good.items() if k != "params"}],
        [{**good, "accuracy": 150.0}],
    ):
        with pytest.raises(ConfigError):
            check_rows(bad)
    with pytest.raises(ConfigError, match="command"):
        write_report([good], tmp_path / "r", {"seed": 0})
    with pytest.raises(ConfigError, match="seed"):
        write_report([good], tmp_path / "r", {"command": "x"})


def test_markdown_table_columns():
    rows = [{"method": "m", "task": "a|b", "params": 1000, "latency_ms_b64": 12.3456}]
    md = markdown_table(rows, columns=["task", "params", "latency_ms_b64"])
    lines = md.strip().splitlines()
    assert lines[0] == "| task | params | latency b64 (ms) |"
    assert lines[2] == "| a\\|b | 1,000 | 12.346 |"


def test_machine_info():
    info = machine_info()
    for k in ("platform", "processor", "cores", "torch", "threads"):
        assert k in info
    assert info["torch"] == torch.__version__


# ---- plots ---------------------------------------------------------------------------------------------
def test_plots_write_png(tmp_path):
    rows = [
        {"method": "dvn", "task": t, "level": lv, "density": d, "accuracy": acc, "params": 1}
        for t in ("cifar10", "svhn")
        for lv, d, acc in ((1, 0.25, 80.0), (2, 0.5, 88.0), (3, 1.0, 91.0))
    ] + [
        {"method": "packnet", "scenario": "s", "task": "svhn", "level": i, "params": p, "accuracy": a}
        for i, p, a in ((1, 100, 70.0), (2, 400, 90.0))
    ]
    p = plot_accuracy_vs_density(rows, tmp_path / "figs" / "density.png", title="tiny")
    assert p.stat().st_size > 0 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    matrix = [[10.0, None, None], [12.0, 8.0, None], [12.5, 8.5, 20.0]]
    q = plot_error_matrix(matrix, ["+t1", "+t2", "+t3"], ["t1", "t2", "t3"], tmp_path / "err.png")
    assert q.stat().st_size > 0 and q.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(ConfigError):
        plot_error_matrix(matrix, ["a"], ["t1", "t2", "t3"], tmp_path / "bad.png")
    with pytest.raises(ConfigError):
        plot_accuracy_vs_density([{"method": "m", "task": "t", "accuracy": None}], tmp_path / "bad.png")


def test_import_does_not_load_matplotlib():
    code = "import sys, virtnet.cost; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
