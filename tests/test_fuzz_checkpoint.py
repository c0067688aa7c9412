"""Property-based: random corruptions of a valid checkpoint, .pt and .safetensors, end in a CheckpointError or a
model that holds exactly the file's tensors; never another exception, a hang or a crash."""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import event, given, strategies as st

from tiny import TINY, fuzz, tiny_state_dict

from gss_export.checkpoint import LoadedCheckpoint, load_checkpoint
from gss_export.errors import CheckpointError

FUZZ = fuzz(120)
FORMATS = (".pt", ".safetensors")
DTYPES = (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)


def encode(sd: dict, suffix: str) -> bytes:
    if suffix == ".pt":
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        return buffer.getvalue()
    from safetensors.torch import save

    return save(sd)


class Valid(tuple):
    """(state dict, {suffix: file bytes}), shown briefly in a failing example."""

    def __repr__(self) -> str:
        return "<the tiny checkpoint>"


@pytest.fixture(scope="module")
def valid():
    sd = tiny_state_dict()
    return Valid((sd, {suffix: encode(sd, suffix) for suffix in FORMATS}))


def load(tmp_path, suffix: str, data: bytes):
    path = tmp_path / f"ckpt{suffix}"
    path.write_bytes(data)
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as e:
        event("CheckpointError")
        text = str(e)
        assert text and len(text.splitlines()) <= 30 and "Traceback" not in text, text
        return None
    event("loaded")
    assert isinstance(loaded, LoadedCheckpoint)
    return loaded


@FUZZ
@given(suffix=st.sampled_from(FORMATS), cut=st.floats(0, 1, exclude_max=True),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4), truncate=st.booleans())
def test_truncated_or_flipped_bytes(tmp_path_factory, valid, suffix, cut, flips, truncate):
    data = bytearray(valid[1][suffix])
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    if truncate:
        data = data[: int(cut * len(data))]
    loaded = load(tmp_path_factory.mktemp("bytes"), suffix, bytes(data))
    if loaded is not None:  # a flip in the weights' bytes reads as other weights, of the same shapes
        assert loaded.model.state_dict().keys() == valid[0].keys()
        assert all(loaded.model.state_dict()[k].shape == v.shape for k, v in valid[0].items())


KEY = st.integers(0, 10_000)  # an index into the sorted keys


@st.composite
def edits(draw):
    """A list of (kind, key index, detail) edits of the state dict."""
    kinds = st.sampled_from(["rename", "drop", "extra", "dtype", "shape", "dtype"])
    return draw(st.lists(st.tuples(kinds, KEY, st.integers(0, 7)), min_size=1, max_size=3))


def apply(sd: dict, changes) -> tuple[dict, bool]:
    """The edited state dict, and whether it should still load (only floating-point dtype changes)."""
    sd, loads = dict(sd), True
    for kind, index, detail in changes:
        keys = sorted(sd)
        if not keys:
            break
        key = keys[index % len(keys)]
        if kind == "rename":
            sd[key.replace(".", "_", 1) if detail % 2 else key + "x"] = sd.pop(key)
        elif kind == "drop":
            del sd[key]
        elif kind == "extra":
            sd[f"layers.{detail}.extra.weight" if detail % 2 else f"extra_{detail}"] = torch.zeros(detail + 1)
        elif kind == "dtype":
            dtype = DTYPES[detail]
            sd[key] = sd[key].to(dtype)
            loads = loads and dtype.is_floating_point
            continue
        else:  # one axis one longer or shorter (a scalar gains an axis)
            t = sd[key]
            shape = list(t.shape) or [1]
            axis = detail % len(shape)
            shape[axis] = max(shape[axis] + (1 if detail % 2 else -1), 0)
            sd[key] = torch.zeros(shape, dtype=t.dtype)
        loads = False
    return sd, loads


@pytest.mark.filterwarnings("ignore:Casting complex values")  # the edits themselves may cast complex to real
@FUZZ
@given(suffix=st.sampled_from(FORMATS), changes=edits())
def test_renamed_missing_extra_keys_wrong_dtypes_and_shapes(tmp_path_factory, valid, suffix, changes):
    sd, should_load = apply(valid[0], changes)
    try:
        data = encode(sd, suffix)
    except Exception:  # safetensors has no complex dtype: that file cannot exist
        event("cannot be saved")
        return
    loaded = load(tmp_path_factory.mktemp("keys"), suffix, data)
    if should_load:
        assert loaded is not None, changes
    if loaded is not None:  # the model holds exactly the file's tensors (as float32)
        got = loaded.model.state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k].float()) for k in sd)
        assert loaded.config.to_dict()["num_tokens"] == TINY["num_tokens"] or not should_load
