"""Fuzzing config loading (hypothesis): random keys, types, huge and negative numbers, booleans, NaN and
infinities, non-UTF-8 bytes, duplicate keys, damaged YAML / TOML / JSON text. One rule: a one-line
``ConfigError``, or a config that was accepted as written (no boolean read as a number, no float
truncated to an integer, every integer within 64 bits) and that round-trips through ``to_dict``."""

from __future__ import annotations

import atexit
import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtnet.config import RunConfig, flatten, read_config_file, set_dotted
from virtnet.errors import ConfigError

EXAMPLES = 1000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
WORK = Path(tempfile.mkdtemp(prefix="virtnet-fuzz-config-", dir=_SHM))
atexit.register(shutil.rmtree, WORK, True)
COUNTS: dict[str, int] = {}

BASE = {
    "seed": 3,
    "output_dir": "runs/fuzz",
    "data": {
        "sampling": "all",
        "tasks": [
            {
                "name": "a",
                "dataset": "synthetic",
                "options": {"num_classes": 3, "size": 8, "num_train": 48, "num_test": 24, "seed": 1},
                "train_size": 30,
            }
        ],
    },
    "model": {"name": "resnet", "depth": 8, "width": 0.5, "feature_size": 8},
    "method": {"name": "joint"},
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "progress": False, "clip_grad_norm": 1.0},
    "cost": {"threads": 1, "batch_sizes": [1, 4], "repeats": 3},
}
KEYS = sorted(set(flatten(BASE)) | set(flatten(RunConfig.from_dict(BASE).to_dict())))

NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 10**12, -(2**63)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e9, 1e20, 1e30, 0.5, -0.0, 1.0, 2.0])
)
WORDS = st.sampled_from(["1e-3", "3", "true", "", "x", "sgd", "resnet", "digits", "\x00", "é"])
SCALARS = st.none() | st.booleans() | NUMBERS | WORDS | st.text(max_size=4)
VALUES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(WORDS, SCALARS, max_size=2)


def _accepted_as_written(cfg: RunConfig, key: str, value) -> None:
    """A key given ``value`` that was accepted kept its meaning."""
    eff = flatten(cfg.to_dict())
    if key not in eff or isinstance(value, (dict, list)):
        return
    got = eff[key]
    if isinstance(value, bool):
        assert isinstance(got, bool) and got == value, (key, value, got)  # never read as 0 / 1
    elif isinstance(value, float):
        assert not isinstance(got, bool), (key, value, got)
        assert not isinstance(got, int) or isinstance(value, int), (key, value, got)  # no float -> int
        assert math.isfinite(value), (key, value, got)  # inf / nan never accepted
    elif isinstance(value, int):
        assert not isinstance(got, bool) and got == value and abs(value) < 2**63, (key, value, got)


def _load(d, counter: str):
    COUNTS[counter] = COUNTS.get(counter, 0) + 1
    try:
        cfg = RunConfig.from_dict(d, source="fuzz.yaml")
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.yaml: "), str(e)
        return None
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    return cfg


@FUZZ
@given(
    key=st.sampled_from(KEYS) | st.sampled_from(["train.x", "model.y", "zzz", "data.tasks[0].q", "method.k"]),
    op=st.sampled_from(["replace", "replace", "delete"]),
    value=VALUES,
)
def test_random_keys_types_and_numbers(key, op, value):
    d = copy.deepcopy(BASE)
    if op == "delete":
        top = key.split(".")[0].split("[")[0]
        d.pop(top, None)
    else:
        try:
            set_dotted(d, key, value)
        except ConfigError:
            return _load(d, "keys")  # the key cannot be set in this shape: load what there is
    cfg = _load(d, "keys")
    if cfg is not None and op == "replace":
        _accepted_as_written(cfg, key, value)


TEXT_KINDS = st.sampled_from(["yaml", "json", "toml"])


def _render(kind: str, d) -> str:
    if kind == "yaml":
        return yaml.safe_dump(d)
    if kind == "json":
        return json.dumps(d)
    lines = []  # a small TOML writer for BASE's shape (tables and inline arrays)
    for k, v in d.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {json.dumps(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            for kk, vv in v.items():
                if isinstance(vv, (str, int, float, bool)) or (
                    isinstance(vv, list) and all(isinstance(x, (int, float)) for x in vv)
                ):
                    lines.append(f"{kk} = {json.dumps(vv)}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(kind=TEXT_KINDS, data=st.data())
def test_damaged_text_non_utf8_bytes_and_duplicate_keys(kind, data):
    text = _render(kind, BASE).encode()
    how = data.draw(st.sampled_from(["flip", "cut", "duplicate", "random", "insert"]))
    if how == "flip":
        b = bytearray(text)
        for _ in range(data.draw(st.integers(1, 3))):
            b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
        raw = bytes(b)
    elif how == "cut":
        raw = text[: data.draw(st.integers(0, len(text)))]
    elif how == "duplicate":  # a line repeated: a key given twice in one mapping (or a list item)
        lines = text.decode().splitlines(keepends=True)
        i = data.draw(st.integers(0, len(lines) - 1))
        raw = "".join(lines[: i + 1] + [lines[i]] + lines[i + 1 :]).encode()
    elif how == "insert":
        i = data.draw(st.integers(0, len(text)))
        raw = text[:i] + data.draw(st.binary(min_size=1, max_size=4)) + text[i:]
    else:
        raw = data.draw(st.binary(max_size=64))
    COUNTS["text"] = COUNTS.get("text", 0) + 1
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"fuzz.{kind}"
    path.write_bytes(raw)
    try:
        d = read_config_file(path)
        cfg = RunConfig.from_dict(d, source=str(path))
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        return
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_duplicate_keys_are_refused_in_every_format():
    for name, text in (
        ("d.yaml", "seed: 1\nseed: 2\n"),
        ("d.json", '{"seed": 1, "seed": 2}'),
        ("d.toml", "seed = 1\nseed = 2\n"),
    ):
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / name).write_text(text)
        try:
            read_config_file(WORK / name)
        except ConfigError as e:
            text = str(e).lower()
            assert "duplicate" in text or "defined" in text or "overwrite" in text, e
        else:
            raise AssertionError(f"{name}: duplicate key accepted")


def test_fuzz_ran_enough_cases():
    if not COUNTS:
        return
    assert COUNTS.get("keys", 0) >= EXAMPLES and COUNTS.get("text", 0) >= EXAMPLES, COUNTS
