"""Checkpoint intake: every saving style loads to upstream's logits; every bad input gets a telling CheckpointError."""
from __future__ import annotations

import json
import random
import zipfile

import pytest
import torch
from gated_state_spaces_pytorch import GatedDsConvLM as Upstream
from gated_state_spaces_pytorch.autoregressive_wrapper import AutoregressiveWrapper
from safetensors.torch import save_file

from gss_export.checkpoint import LoadedCheckpoint, infer_config, load_checkpoint, read_state_dict
from gss_export.errors import CheckpointError
from gss_export.families import DsConvConfig

SMALL = dict(num_tokens=256, dim=32, depth=2, heads=4, dim_dsconv=16, dim_expansion_factor=2)


@pytest.fixture(scope="module")
def upstream():
    torch.manual_seed(0)
    return Upstream(**SMALL).eval()


@pytest.fixture(scope="module")
def sd(upstream):
    return {k: v.clone() for k, v in upstream.state_dict().items()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, SMALL["num_tokens"], (2, 37), generator=torch.Generator().manual_seed(1))


def assert_matches(loaded: LoadedCheckpoint, reference: torch.nn.Module, ids: torch.Tensor) -> None:
    """Loaded model is eval-mode float32 and reproduces the reference's logits."""
    assert isinstance(loaded, LoadedCheckpoint) and not loaded.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.model.parameters())
    with torch.no_grad():
        got, want = loaded.model(ids), reference(ids)
    # rtol 1e-5; atol at the same relative level of the logit scale, for logits near zero
    # (our power-of-two FFT and upstream's next_fast_len FFT round differently)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), (got - want).abs().max()


def save(obj, path):
    torch.save(obj, path)
    return path


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


# (name, wrap(state_dict) -> saved object, note expected among LoadedCheckpoint.notes or None)
GOOD = [
    ("plain", lambda sd: sd, None),
    *[(f"nested-{k}", lambda sd, k=k: {k: sd, "optimizer": {"state": {}, "param_groups": []}, "step": 10}, f"unwrapped {k!r}")
      for k in ("model", "state_dict", "model_state_dict", "module")],
    ("nested-twice", lambda sd: {"state_dict": {"model": sd}, "epoch": 3}, "unwrapped 'model'"),
    ("nested-with-tensor-sibling", lambda sd: {"model": sd, "step": torch.tensor(5)}, "unwrapped 'model'"),
    *[(f"prefix-{p}", lambda sd, p=p: prefixed(sd, p), f"stripped prefix {p!r}")
      for p in ("net.", "module.", "_orig_mod.", "module._orig_mod.net.")],
    ("lightning", lambda sd: {"state_dict": prefixed(sd, "model."), "global_step": 7}, "stripped prefix 'model.'"),
    ("ddp-nested", lambda sd: {"model_state_dict": prefixed(sd, "module."), "optimizer": {}}, "stripped prefix 'module.'"),
]


@pytest.mark.parametrize("name,wrap,note", GOOD, ids=[g[0] for g in GOOD])
def test_saved_forms_load_to_upstream_logits(tmp_path, upstream, sd, ids, name, wrap, note):
    loaded = load_checkpoint(save(wrap(sd), tmp_path / "ckpt.pt"))
    assert loaded.config == DsConvConfig(**SMALL, max_seq_len=2048)
    assert note is None or note in loaded.notes, loaded.notes
    assert loaded.source == str(tmp_path / "ckpt.pt")
    assert_matches(loaded, upstream, ids)


def test_autoregressive_wrapper_state_dict(tmp_path, upstream, ids):
    loaded = load_checkpoint(save(AutoregressiveWrapper(upstream).state_dict(), tmp_path / "wrapper.pt"))
    assert "stripped prefix 'net.'" in loaded.notes
    assert_matches(loaded, upstream, ids)


def test_safetensors_and_legacy_format(tmp_path, upstream, sd, ids):
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert_matches(load_checkpoint(tmp_path / "model.safetensors"), upstream, ids)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_matches(load_checkpoint(tmp_path / "legacy.pt"), upstream, ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_cast_to_float32(tmp_path, sd, ids, dtype):
    low = {k: v.to(dtype) for k, v in sd.items()}
    reference = Upstream(**SMALL).eval()
    reference.load_state_dict({k: v.float() for k, v in low.items()})  # the same rounding, upstream
    save_file(low, str(tmp_path / "half.safetensors"))
    for path in (save(low, tmp_path / "half.pt"), tmp_path / "half.safetensors"):
        loaded = load_checkpoint(path)
        name = str(dtype).removeprefix("torch.")
        assert f"cast {name} -> float32 ({len(sd)} tensors)" in loaded.notes
        assert_matches(loaded, reference, ids)


@pytest.mark.parametrize("conv", ["fft", "direct"])
def test_non_integer_expansion_factor_and_conv_forms(tmp_path, ids, conv):
    torch.manual_seed(2)
    cfg = dict(SMALL, depth=3, heads=2, dim_expansion_factor=1.5)
    up = Upstream(**cfg, max_seq_len=64).eval()
    loaded = load_checkpoint(save(up.state_dict(), tmp_path / "c.pt"), max_seq_len=64, conv=conv)
    assert loaded.config == DsConvConfig(**cfg, max_seq_len=64)
    assert loaded.model.conv_form == conv
    assert_matches(loaded, up, ids)


def test_read_state_dict_and_infer_config(tmp_path, sd):
    got, notes = read_state_dict(save({"module": prefixed(sd, "_orig_mod.")}, tmp_path / "c.pt"))
    assert set(got) == set(sd) and notes == ["unwrapped 'module'", "stripped prefix '_orig_mod.'"]
    assert infer_config(got, max_seq_len=100) == DsConvConfig(**SMALL, max_seq_len=100)
    assert isinstance(infer_config(got).dim_expansion_factor, int)
    with pytest.raises(CheckpointError, match="max_seq_len"):
        infer_config(got, max_seq_len=0)
    with pytest.raises(CheckpointError, match="max_seq_len"):
        load_checkpoint(tmp_path / "c.pt", max_seq_len=-5)


def test_prefix_stripped_only_when_every_key_has_it(tmp_path, sd):
    mixed = dict(prefixed(sd, "module."), extra=torch.zeros(1))
    got, notes = read_state_dict(save(mixed, tmp_path / "c.pt"))
    assert not notes and "module.token_emb.weight" in got


def test_trust_pickle_loads_a_pickled_module(tmp_path, upstream, ids):
    loaded = load_checkpoint(save({"model": upstream}, tmp_path / "whole.pt"), trust_pickle=True)
    assert "took state_dict() of pickled GatedDsConvLM" in loaded.notes
    assert_matches(loaded, upstream, ids)


# ---- refusals ---------------------------------------------------------------------------------


def refused(path, *words, **kwargs) -> str:
    """load_checkpoint(path) raises CheckpointError whose message holds every word; returns the message."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in:\n{message}"
    assert len(message.splitlines()) <= 20 and "Traceback" not in message
    return message


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_module_is_refused(tmp_path, upstream, legacy):
    path = tmp_path / "whole.pt"
    torch.save(upstream, path, _use_new_zipfile_serialization=not legacy)
    refused(path, "pickled Python objects", "could run code", "--trust-pickle", "GatedDsConvLM")


class _Marker:
    """Unpickling this creates a file: the stand-in for code hidden in a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_refusal_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = save({"token_emb.weight": torch.zeros(2, 2), "payload": _Marker(marker)}, tmp_path / "evil.pt")
    assert not marker.exists()
    refused(path, "pickled Python objects", "--trust-pickle")
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    assert not marker.exists()
    # the flag is what lets it run
    with pytest.raises(CheckpointError):
        load_checkpoint(path, trust_pickle=True)
    assert marker.exists()


def test_missing_directory_and_empty(tmp_path):
    refused(tmp_path / "nope.pt", "not found", "nope.pt")
    refused(tmp_path, "is a directory")
    (tmp_path / "empty.pt").write_bytes(b"")
    refused(tmp_path / "empty.pt", "empty (0 bytes)")


def test_truncated_files(tmp_path, sd):
    full = save(sd, tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(full[: len(full) // 2])
    refused(tmp_path / "cut.pt", "truncated or corrupt", "torch.save")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    full = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "legacy_cut.pt").write_bytes(full[: len(full) // 2])
    refused(tmp_path / "legacy_cut.pt", "truncated or corrupt")
    save_file(sd, str(tmp_path / "full.safetensors"))
    full = (tmp_path / "full.safetensors").read_bytes()
    for cut in (len(full) // 2, 20):  # data cut short; header cut short
        (tmp_path / "cut.safetensors").write_bytes(full[:cut])
        refused(tmp_path / "cut.safetensors", "truncated or corrupt", "safetensors")


def test_foreign_files(tmp_path):
    (tmp_path / "notes.pt").write_text("these are not the weights you are looking for\n")
    refused(tmp_path / "notes.pt", "not a PyTorch checkpoint or safetensors file", "text file")
    (tmp_path / "config.json").write_text(json.dumps({"dim": 32, "depth": 2}))
    refused(tmp_path / "config.json", "not a PyTorch checkpoint", "JSON")
    (tmp_path / "noise.bin").write_bytes(b"\x00\xff" + random.Random(0).randbytes(4094))
    refused(tmp_path / "noise.bin", "not a PyTorch checkpoint", "binary")
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as z:
        z.writestr("readme.txt", "hello")
    refused(tmp_path / "archive.pt", "zip archive but not a torch.save checkpoint")
    (tmp_path / "fake.safetensors").write_text("not really")
    refused(tmp_path / "fake.safetensors", "corrupt")


def test_no_tensors_or_no_model_keys(tmp_path, sd):
    refused(save({"step": 3, "lr": 0.1}, tmp_path / "a.pt"), "contains no tensors", "'step'")
    refused(save({"ema": sd, "step": 3}, tmp_path / "b.pt"), "contains no tensors", "'ema'", "not a recognised nesting key")
    refused(save(torch.zeros(3), tmp_path / "c.pt"), "not a state dict")
    refused(save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "d.pt"), "no gated-state-spaces LM weights", "encoder.weight")
    refused(save(prefixed(sd, "gss."), tmp_path / "e.pt"), "no gated-state-spaces LM weights", "prefix 'gss.'")


def test_missing_unexpected_and_misshapen_reported_together(tmp_path, sd):
    bad = dict(sd)
    for k in ("layers.0.to_u.0.weight", "layers.1.to_u.0.weight", "to_logits.weight"):
        del bad[k]
    bad["lm_head.weight"] = torch.zeros(256, 32)
    bad["layers.1.to_out.weight"] = torch.zeros(32, 40)
    bad["layers.0.dsconv.param_D"] = torch.zeros(16, dtype=torch.int64)
    message = refused(
        save(bad, tmp_path / "bad.pt"),
        "missing keys (3): to_logits.weight, layers.{0,1}.to_u.0.weight",
        "unexpected keys (1): lm_head.weight",
        "layers.1.to_out.weight: expected (32, 64), got (32, 40)",
        "layers.0.dsconv.param_D: dtype int64",
        "dim_expansion_factor=2",
    )
    assert message.count("\n") < 12


def test_long_key_lists_are_capped(tmp_path, sd):
    bad = dict(sd, **{f"extra{i}.weight": torch.zeros(1) for i in range(20)})
    refused(save(bad, tmp_path / "c.pt"), "unexpected keys (20)", "... and 8 more")


def test_non_contiguous_layers(tmp_path, sd):
    bad = {k.replace("layers.1.", "layers.2."): v for k, v in sd.items()}
    refused(save(bad, tmp_path / "c.pt"), "not contiguous", "missing 1")


def test_unknown_conv_form(tmp_path, sd):
    refused(save(sd, tmp_path / "c.pt"), "unknown convolution form", conv="fast")
