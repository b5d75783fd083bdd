"""Fuzzing checkpoint loading (hypothesis): byte flips in either file, truncation, and JSON mutations of
every key of the sidecar. One rule: a virtnet error (``VirtnetError``), or a correct load, i.e. exactly
the saved tensors and metadata. Never another exception type, never wrong weights."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtnet.errors import VirtnetError
from virtnet.train.checkpoint import load_checkpoint, load_checkpoint_with_fallback, save_checkpoint

EXAMPLES = 1000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _original() -> tuple[bytes, bytes, dict, dict[str, torch.Tensor]]:
    state = {"conv.weight": torch.arange(12, dtype=torch.float32).view(2, 1, 2, 3), "bn.n": torch.tensor(3)}
    meta = {
        "config": {"seed": 0, "train": {"lr": 0.1, "epochs": 2}},
        "method": "joint",
        "seed": 0,
        "tasks": [
            {"name": "a", "in_channels": 1, "input_size": 8, "num_outputs": 3, "mean": [0.5], "std": [0.2]}
        ],
        "state": {"phase": 0, "epoch": 1, "step": 0, "global_step": 6},
        "structure": {"units": [0, 1]},
    }
    with tempfile.TemporaryDirectory() as d:
        jpath = save_checkpoint(Path(d) / "ck", state, meta)
        tbytes = (Path(d) / "ck.safetensors").read_bytes()
        jbytes = jpath.read_bytes()
    return tbytes, jbytes, json.loads(jbytes), state


TBYTES, JBYTES, META, STATE = _original()
COUNTS: dict[str, int] = {}
# one folder, rewritten by every example; in memory where the machine has /dev/shm (a disk write can
# cost milliseconds, a thousand times what the load itself costs here)
_SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
WORK = Path(tempfile.mkdtemp(prefix="virtnet-fuzz-", dir=_SHM))
atexit.register(shutil.rmtree, WORK, True)


def _check(tbytes: bytes, jbytes: bytes, counter: str, fallback: bool = False) -> None:
    """Load the pair; the one rule."""
    COUNTS[counter] = COUNTS.get(counter, 0) + 1
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "ck.safetensors").write_bytes(tbytes)
    (WORK / "ck.json").write_bytes(jbytes)
    try:
        ck = (load_checkpoint_with_fallback if fallback else load_checkpoint)(WORK / "ck")
    except VirtnetError as e:
        assert "\n" not in str(e), str(e)
        return
    assert ck.meta == META
    assert set(ck.model_state) == set(STATE)
    for k, v in STATE.items():
        assert ck.model_state[k].dtype == v.dtype and torch.equal(ck.model_state[k], v), k


@FUZZ
@given(which=st.sampled_from(["tensors", "sidecar"]), data=st.data())
def test_byte_flips_in_either_file(which, data):
    target = TBYTES if which == "tensors" else JBYTES
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(target) - 1), st.integers(1, 255)), min_size=1, max_size=3)
    )
    b = bytearray(target)
    for i, x in flips:
        b[i] ^= x
    if which == "tensors":
        _check(bytes(b), JBYTES, "byte_flips")
    else:
        _check(TBYTES, bytes(b), "byte_flips")


@FUZZ
@given(which=st.sampled_from(["tensors", "sidecar", "both"]), cut=st.floats(0.0, 1.0), fallback=st.booleans())
def test_truncation(which, cut, fallback):
    t = TBYTES[: int(len(TBYTES) * cut)] if which in ("tensors", "both") else TBYTES
    j = JBYTES[: int(len(JBYTES) * cut)] if which in ("sidecar", "both") else JBYTES
    _check(t, j, "truncation", fallback)


def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, (*prefix, i))


PATHS = [p for p in _paths(META) if p]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["1", "virtnet-checkpoint", "a" * 64, "0" * 64]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(
    path=st.sampled_from(PATHS),
    op=st.sampled_from(["replace", "delete", "add"]),
    value=JSON_VALUES,
    key=st.text(max_size=6),
)
def test_json_mutations_of_every_key(path, op, value, key):
    meta = json.loads(JBYTES)
    parent = meta
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        if isinstance(parent, list):
            parent.pop(last)
        else:
            del parent[last]
    else:
        target = parent[last]
        if isinstance(target, dict):
            target[key] = value
        elif isinstance(target, list):
            target.append(value)
        else:
            parent[last] = [target, value]
    _check(TBYTES, json.dumps(meta).encode(), "json_mutations")


def test_fuzz_ran_enough_cases():
    """Runs after the fuzz tests in this file (pytest keeps file order): at least 1,000 loads each."""
    if not COUNTS:  # run alone (-k): nothing to check
        return
    for name in ("byte_flips", "truncation", "json_mutations"):
        assert COUNTS.get(name, 0) >= EXAMPLES, COUNTS
