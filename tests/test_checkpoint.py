"""Checkpoints: safetensors + JSON sidecar, sha256 check, atomic writes, optimizer round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from virtnet.errors import CheckpointError
from virtnet.train.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    load_model_state,
    optimizer_from_flat,
    read_meta,
    save_checkpoint,
    sha256_file,
)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def trained_tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    m = tiny()
    m(torch.randn(4, 1, 6, 6))  # materialise the lazy layer, move BN statistics
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(4, 1, 6, 6)).sum().backward()
        opt.step()
    return m, opt


def test_round_trip_is_exact_including_buffers(tmp_path):
    m, opt = trained_tiny()
    save_checkpoint(
        tmp_path / "ck", m.state_dict(), {"seed": 3}, optimizer=opt, rng_state=torch.get_rng_state()
    )
    ck = load_checkpoint(tmp_path / "ck.json")
    for k, v in m.state_dict().items():
        assert torch.equal(ck.model_state[k], v), k
    assert "1.running_mean" in ck.model_state and "1.num_batches_tracked" in ck.model_state
    assert ck.meta["seed"] == 3
    assert ck.meta["sha256"] == sha256_file(tmp_path / "ck.safetensors")
    assert torch.equal(ck.rng_state, torch.get_rng_state()) or ck.rng_state.numel() > 0

    m2 = tiny()
    m2(torch.randn(1, 1, 6, 6))
    load_model_state(m2, ck.model_state)
    x = torch.randn(5, 1, 6, 6)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))


def test_optimizer_state_round_trip_gives_same_next_step(tmp_path):
    m, opt = trained_tiny()
    save_checkpoint(tmp_path / "ck", m.state_dict(), {}, optimizer=opt)
    ck = load_checkpoint(tmp_path / "ck")
    m2 = tiny()
    m2(torch.randn(1, 1, 6, 6))
    load_model_state(m2, ck.model_state)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    optimizer_from_flat(opt2, ck.optim_tensors, ck.meta["optimizer"])
    x = torch.randn(4, 1, 6, 6)
    m.train(), m2.train()
    for model, o in ((m, opt), (m2, opt2)):
        o.zero_grad()
        model(x).sum().backward()
        o.step()
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_altered_tensor_file_is_refused(tmp_path):
    m, _ = trained_tiny()
    save_checkpoint(tmp_path / "ck", m.state_dict(), {})
    tpath, _ = checkpoint_paths(tmp_path / "ck")
    data = bytearray(tpath.read_bytes())
    data[-1] ^= 0xFF  # flip the bits of the last weight byte
    tpath.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(tmp_path / "ck")


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a virtnet checkpoint"):
        read_meta(tmp_path / "x.json")
    m, _ = trained_tiny()
    save_checkpoint(tmp_path / "ck", m.state_dict(), {})
    meta = json.loads((tmp_path / "ck.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "ck")


def test_state_for_a_different_network_is_refused(tmp_path):
    m, _ = trained_tiny()
    save_checkpoint(tmp_path / "ck", m.state_dict(), {})
    ck = load_checkpoint(tmp_path / "ck")
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(CheckpointError, match="different network: '0.weight' has shape"):
        load_model_state(other, ck.model_state, "ck")
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        load_model_state(
            nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
            {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2), "1.weight": torch.zeros(2, 2)},
        )


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    m, _ = trained_tiny()
    for _ in range(3):
        save_checkpoint(tmp_path / "ck", m.state_dict(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]
