"""Crash-safe checkpoints: the previous good pair is kept until the new one is complete, loading falls
back to it with a notice, temporary files are removed on SIGTERM / SIGINT and cleaned after a kill, and
every damaged or hand-edited sidecar is a one-line CheckpointError."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import save

from virtnet import storage
from virtnet.errors import CheckpointError, VirtnetError
from virtnet.train.checkpoint import (
    checkpoint_paths,
    clean_stale_temp,
    load_checkpoint,
    load_checkpoint_with_fallback,
    read_meta,
    save_checkpoint,
    sha256_bytes,
)

TASK = {"name": "t", "in_channels": 1, "input_size": 8, "num_outputs": 3}


def state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), v), "b": torch.arange(3, dtype=torch.float32) + v}


def meta(step: int) -> dict:
    return {
        "config": {"seed": 0},
        "tasks": [dict(TASK)],
        "state": {"phase": 0, "epoch": 0, "step": step, "global_step": step},
    }


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_keep_previous_keeps_the_last_complete_pair(tmp_path):
    stem = tmp_path / "last"
    save_checkpoint(stem, state(1.0), meta(1), keep_previous=True)
    assert listing(tmp_path) == ["last.json", "last.safetensors"]  # nothing to keep the first time
    save_checkpoint(stem, state(2.0), meta(2), keep_previous=True)
    assert listing(tmp_path) == ["last.json", "last.prev.json", "last.prev.safetensors", "last.safetensors"]
    assert torch.equal(load_checkpoint(stem).model_state["w"], torch.full((2, 3), 2.0))
    prev = load_checkpoint(tmp_path / "last.prev")
    assert torch.equal(prev.model_state["w"], torch.full((2, 3), 1.0))
    assert prev.meta["state"]["global_step"] == 1


def test_crash_between_the_two_renames_falls_back_to_the_previous_checkpoint(tmp_path, monkeypatch):
    stem = tmp_path / "last"
    save_checkpoint(stem, state(1.0), meta(1), keep_previous=True)
    save_checkpoint(stem, state(2.0), meta(2), keep_previous=True)
    real = os.replace
    renamed: list[str] = []

    def crash_before_sidecar(src, dst):
        if str(dst).endswith("last.json"):  # the tensor file is already renamed in: die here
            raise KeyboardInterrupt("killed between the renames")
        renamed.append(os.path.basename(str(dst)))
        return real(src, dst)

    monkeypatch.setattr(storage.os, "replace", crash_before_sidecar)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(stem, state(3.0), meta(3), keep_previous=True)
    monkeypatch.setattr(storage.os, "replace", real)
    assert renamed == ["last.prev.safetensors", "last.prev.json", "last.safetensors"]
    # no temporary file survives the interrupted write
    assert listing(tmp_path) == ["last.json", "last.prev.json", "last.prev.safetensors", "last.safetensors"]
    with pytest.raises(CheckpointError, match="sha256 mismatch|bytes, but"):
        load_checkpoint(stem)  # new tensors, old sidecar
    ck = load_checkpoint_with_fallback(stem)
    assert torch.equal(ck.model_state["w"], torch.full((2, 3), 2.0))  # step 2: the last complete one
    assert ck.meta["state"]["global_step"] == 2
    assert ck.notice is not None and "\n" not in ck.notice
    assert "fell back to the previous virtnet checkpoint" in ck.notice and "last.prev.json" in ck.notice
    # the next save repairs the pair and keeps the good previous one (not the damaged latest)
    save_checkpoint(stem, state(4.0), meta(4), keep_previous=True)
    assert load_checkpoint_with_fallback(stem).notice is None
    assert load_checkpoint(tmp_path / "last.prev").meta["state"]["global_step"] == 2


def test_fallback_without_notice_when_latest_is_fine_and_error_when_both_are_bad(tmp_path):
    stem = tmp_path / "last"
    save_checkpoint(stem, state(1.0), meta(1), keep_previous=True)
    ck = load_checkpoint_with_fallback(stem)
    assert ck.notice is None and ck.meta["state"]["step"] == 1
    (tmp_path / "last.json").write_text('{"format": "virtnet-checkpoint", "format_ver')  # truncated
    with pytest.raises(CheckpointError, match="last.json: not valid JSON"):
        load_checkpoint_with_fallback(stem)  # no .prev to fall back to: the latest's error
    save_checkpoint(stem, state(2.0), meta(2), keep_previous=True)  # latest damaged: .prev keeps step 1
    save_checkpoint(stem, state(3.0), meta(3), keep_previous=True)
    for name in ("last.safetensors", "last.prev.safetensors"):
        p = tmp_path / name
        p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"last\.safetensors: \d+ bytes, but last\.json describes"):
        load_checkpoint_with_fallback(stem)


def test_truncated_latest_falls_back(tmp_path):
    stem = tmp_path / "last"
    save_checkpoint(stem, state(1.0), meta(1), keep_previous=True)
    save_checkpoint(stem, state(2.0), meta(2), keep_previous=True)
    p = tmp_path / "last.safetensors"
    p.write_bytes(p.read_bytes()[:40])
    ck = load_checkpoint_with_fallback(stem)
    assert ck.meta["state"]["step"] == 1
    assert "last.safetensors: 40 bytes" in ck.notice


def test_stale_temp_files_are_ignored_then_cleaned(tmp_path):
    stem = tmp_path / "last"
    save_checkpoint(stem, state(1.0), meta(1))
    for name in (".last.safetensors.k1x2_9", ".last.json.abcd", ".model.json.zz"):
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep me")
    assert load_checkpoint_with_fallback(stem).meta["state"]["step"] == 1  # ignored
    removed = clean_stale_temp(tmp_path)
    names = sorted(p.name for p in removed)
    assert names == [".last.json.abcd", ".last.safetensors.k1x2_9", ".model.json.zz"]
    assert listing(tmp_path) == ["last.json", "last.safetensors", "notes.txt"]
    assert clean_stale_temp(tmp_path / "missing") == []


def _signal_while_writing(monkeypatch, signum):
    """Deliver ``signum`` to this process from inside the write, after the temporary file exists."""
    real = os.fsync
    sent = []

    def fsync_then_signal(fd):
        real(fd)
        if not sent:
            sent.append(fd)
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(storage.os, "fsync", fsync_then_signal)


def test_sigint_while_writing_removes_temp_files_and_restores_the_handler(tmp_path, monkeypatch):
    # a process started in the background by a non-interactive shell (as CI may be) ignores SIGINT:
    # give this test Python's own handler, and put back whatever the process had
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_while_writing(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, outer)


def _sigint_while_writing(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    _signal_while_writing(monkeypatch, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last", state(1.0), meta(1))
    assert listing(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_while_writing_removes_temp_files_then_runs_the_previous_handler(tmp_path, monkeypatch):
    calls = []

    def previous(signum, frame):
        calls.append(signum)
        raise SystemExit(143)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        save_checkpoint(tmp_path / "last", state(1.0), meta(1))
        _signal_while_writing(monkeypatch, signal.SIGTERM)
        with pytest.raises(SystemExit):
            save_checkpoint(tmp_path / "last", state(2.0), meta(2))
        assert calls == [signal.SIGTERM]
        assert listing(tmp_path) == ["last.json", "last.safetensors"]  # the old pair, whole
        assert load_checkpoint(tmp_path / "last").meta["state"]["step"] == 1
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_previous_handler_that_returns_lets_the_write_finish(tmp_path, monkeypatch):
    flags = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: flags.append(signum))  # "stop after this step"
    try:
        _signal_while_writing(monkeypatch, signal.SIGTERM)
        save_checkpoint(tmp_path / "last", state(5.0), meta(5))
        assert flags == [signal.SIGTERM]
        assert listing(tmp_path) == ["last.json", "last.safetensors"]
        assert torch.equal(load_checkpoint(tmp_path / "last").model_state["w"], torch.full((2, 3), 5.0))
    finally:
        signal.signal(signal.SIGTERM, old)


# ---- the sidecar schema: one line naming the file and the key ---------------------------------------
def _edit(tmp_path, fn):
    stem = tmp_path / "ck"
    save_checkpoint(stem, state(1.0), meta(1))
    m = json.loads((tmp_path / "ck.json").read_text())
    fn(m)
    (tmp_path / "ck.json").write_text(json.dumps(m))
    return stem


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version="1"), "format_version: must be an integer, got '1'"),
        (lambda m: m.update(format_version=2), "format version 2 is not supported (this virtnet reads"),
        (lambda m: m["tasks"][0].update(extra=1), "tasks[0].extra: unknown key"),
        (lambda m: m["tasks"][0].pop("num_outputs"), "tasks[0].num_outputs: required key is missing"),
        (lambda m: m["tasks"][0].update(in_channels="x"), "tasks[0].in_channels: Input should be a valid"),
        (lambda m: m["tasks"][0].update(in_channels=-1), "tasks[0].in_channels: Input should be greater"),
        (lambda m: m["tasks"][0].update(input_size=True), "tasks[0].input_size: Input should be a valid int"),
        (lambda m: m.update(tasks="abc"), "tasks: Input should be a valid list"),
        (lambda m: m.update(config=None), "config: Input should be a valid dictionary"),
        (lambda m: m.update(config=[]), "config: Input should be a valid dictionary"),
        (lambda m: m.update(state=None), "state: Input should be a valid dictionary"),
        (lambda m: m["state"].update(phase="x"), "state.phase: Input should be a valid integer"),
        (lambda m: m.update(tasks=[TASK, TASK]), "tasks: task name 't' appears twice"),
        (lambda m: m["tasks"][0].update(input_size=16), "ck.json: altered after saving"),
        (lambda m: m.update(seed=5), "ck.json: altered after saving"),
    ],
)
def test_damaged_sidecars_are_one_line_errors(tmp_path, edit, message):
    stem = _edit(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(stem)
    text = str(e.value)
    assert "\n" not in text
    assert message in text, text
    assert text.startswith(str(tmp_path))


def test_format_version_string_message_is_not_self_contradictory(tmp_path):
    stem = _edit(tmp_path, lambda m: m.update(format_version="1"))
    with pytest.raises(CheckpointError) as e:
        read_meta(stem)
    assert str(e.value) == (
        f"{tmp_path / 'ck.json'}: format_version: must be an integer, got '1' (this virtnet reads version 1)"
    )


def test_mean_std_and_unknown_pass_through_keys_are_accepted(tmp_path):
    m = meta(1)
    m["tasks"][0].update(mean=[0.5], std=[0.25])
    m.update(structure={"units": [0, 1]}, task_info=[{"name": "t"}], class_names={"t": ["a", "b", "c"]})
    save_checkpoint(tmp_path / "ck", state(1.0), m)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.meta["tasks"][0]["mean"] == [0.5] and ck.meta["structure"] == {"units": [0, 1]}


def test_pair_written_before_the_content_hash_still_loads(tmp_path):
    """Files saved before the sidecar hash existed (no key in the safetensors header) load as before."""
    tensors = {f"model/{k}": v for k, v in state(7.0).items()}
    data = save(tensors)
    m = {**meta(1), "format": "virtnet-checkpoint", "format_version": 1, "sha256": sha256_bytes(data)}
    m["num_bytes"] = len(data)
    (tmp_path / "old.safetensors").write_bytes(data)
    (tmp_path / "old.json").write_text(json.dumps(m))
    assert torch.equal(load_checkpoint(tmp_path / "old").model_state["w"], torch.full((2, 3), 7.0))


def test_run_folder_is_accepted_where_a_checkpoint_is_expected(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last", state(1.0), meta(1))
    assert load_checkpoint(run).meta["state"]["step"] == 1  # no model.json yet: checkpoints/last
    save_checkpoint(run / "model", state(2.0), meta(2))
    assert load_checkpoint(run).meta["state"]["step"] == 2  # model.json first
    with pytest.raises(CheckpointError, match="neither model.json nor checkpoints/last.json"):
        load_checkpoint(tmp_path)
    assert checkpoint_paths(run / "model")[1] == run / "model.json"


def test_every_checkpoint_error_is_a_virtnet_error():
    assert issubclass(CheckpointError, VirtnetError)
