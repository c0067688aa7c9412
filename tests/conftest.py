"""Shared fixtures: a small upstream model with random weights and its reference logits."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gss_export.families import GatedDsConvLM, DsConvConfig

# small enough for CI, big enough to have several heads and layers
SMALL = dict(num_tokens=256, dim=64, depth=2, heads=4, dim_dsconv=32, dim_expansion_factor=2)
MAX_LEN = 2048
# the lengths to check: 1, 2, non-powers of two, both sides of 128, and the maximum; 2/3, 16/17, 128/129
# and 1024/1025 straddle the monarch form's block-size changes up to MAX_LEN (its b: 1, 2, 4, 8, 16; 32
# from 8193, in test_long_context.py); 45 and 900 are lengths the torch.export targets were first checked at
LENGTHS = (1, 2, 3, 7, 16, 17, 45, 100, 127, 128, 129, 900, 1000, 1024, 1025, MAX_LEN)
BATCHES = (1, 3)
RTOL = 1e-4


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "byte_lm" / "model.safetensors"
# the other-language runtimes' check (issue: 24 greedy tokens from a 23-token prompt, equal to eager)
LANG_PROMPT = list(b"The for statement is us")
LANG_NEW = 24
# a prompt long enough to go through the prefill graph (more than 128 tokens), 300 bytes of the README
LONG_PROMPT = list((Path(__file__).resolve().parent.parent / "examples" / "byte_lm" / "README.md").read_bytes()[:300])


def run_cli(monkeypatch, capsys, *args):
    """In-process `gss-export ARGS`: (exit code, stdout, stderr)."""
    import sys

    from gss_export.cli import main

    monkeypatch.setattr(sys, "argv", ["gss-export", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def require(condition: bool, reason: str) -> None:
    """Skip when an optional tool is missing; fail instead under GSS_REQUIRE_EXAMPLES=1 (CI sets it)."""
    if not condition:
        if os.environ.get("GSS_REQUIRE_EXAMPLES") == "1":
            pytest.fail(f"{reason} (GSS_REQUIRE_EXAMPLES=1: required here)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def example_upstream():
    """The upstream eager model with the bundled example checkpoint's weights."""
    from gated_state_spaces_pytorch import GatedDsConvLM as Upstream
    from safetensors.torch import load_file

    model = Upstream(num_tokens=256, dim=128, depth=3, heads=4, dim_dsconv=128, dim_expansion_factor=2).eval()
    model.load_state_dict(load_file(str(EXAMPLE)), strict=True)
    return model


def eager_greedy(model, prompt, new, window=None) -> list[int]:
    """Upstream-style decoding: the whole sequence (or its last `window` tokens) re-run for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            context = seq if window is None else seq[-window:]
            seq.append(int(model(torch.tensor([context]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="session")
def long_reference(example_upstream) -> list[int]:
    """The 24 greedy tokens upstream eager makes after LONG_PROMPT."""
    assert len(LONG_PROMPT) == 300
    return eager_greedy(example_upstream, LONG_PROMPT, LANG_NEW)


@pytest.fixture(scope="session")
def lang_reference(example_upstream) -> list[int]:
    """The 24 greedy tokens upstream eager makes after LANG_PROMPT."""
    assert len(LANG_PROMPT) == 23
    return eager_greedy(example_upstream, LANG_PROMPT, LANG_NEW)


@pytest.fixture(scope="session")
def upstream():
    """The upstream eager model (the reference), random weights."""
    from gated_state_spaces_pytorch import GatedDsConvLM as Upstream

    torch.manual_seed(1234)
    return Upstream(**SMALL, max_seq_len=MAX_LEN).eval()


@pytest.fixture(scope="session")
def ours(upstream) -> GatedDsConvLM:
    """Our model carrying the upstream weights, loaded with strict=True."""
    model = GatedDsConvLM(DsConvConfig(**SMALL, max_seq_len=MAX_LEN))
    model.load_state_dict(upstream.state_dict(), strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def reference(upstream):
    """{(batch, length): (input_ids, upstream logits)} for every test shape."""
    rng = np.random.default_rng(7)
    table = {}
    for b in BATCHES:
        for n in LENGTHS:
            ids = rng.integers(0, SMALL["num_tokens"], size=(b, n), dtype=np.int64)
            with torch.no_grad():
                table[(b, n)] = (ids, upstream(torch.from_numpy(ids)).numpy())
    return table


def max_errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max abs error, max abs error / max |want|)."""
    diff = float(np.abs(got.astype(np.float64) - want).max())
    return diff, diff / float(np.abs(want).max())


NO_TORCH = '''
import sys
class _NoTorch:
    """Any import of torch or torch.* fails, as on a machine without torch."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None
sys.meta_path.insert(0, _NoTorch())
try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError("the torch blocker does not work")
'''
# appended to every torch-free script: proves nothing pulled torch (or gss_export, which needs it) in
LEAK_CHECK = '''
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "gss_export"))
assert not leaked, leaked
'''


def run_without_torch(script: str, timeout: int = 300):
    """Run `script` in a fresh interpreter where importing torch fails; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", NO_TORCH + script + LEAK_CHECK], capture_output=True, text=True, timeout=timeout)


def export_example(tmp_path_factory, fmt: str) -> Path:
    """The bundled example exported to `fmt` (not validated: the parity tests do that) in a fresh folder."""
    from gss_export.checkpoint import load_checkpoint
    from gss_export.export import export_model

    out = tmp_path_factory.mktemp(f"byte_lm_{fmt}")
    export_model(load_checkpoint(EXAMPLE).model, fmt, out, validate=False)
    return out


@pytest.fixture(scope="session")
def example_onnx(tmp_path_factory) -> Path:
    """The bundled example exported to ONNX once per session: model.onnx, decoder.onnx, config.json."""
    return export_example(tmp_path_factory, "onnx")


# ---- the recurrent families: small random models, exported once per session -------------------------
FAMILY_SMALL = {
    "gss": dict(num_tokens=256, dim=64, depth=2, dss_kernel_N=32, dss_kernel_H=48, dim_expansion_factor=2),
    "mhesa": dict(num_tokens=256, dim=64, depth=2, heads=4, dim_mhesa=32, dim_expansion_factor=2),
}
FAMILY_MAX_LEN = 1100  # past 1024/1025, the monarch form's last block change below 8193


def family_upstream(family: str):
    """Upstream's eager model of the small `family` config, seeded random weights."""
    from gss_export.families import FAMILIES

    torch.manual_seed({"gss": 11, "mhesa": 12}[family])
    entry = FAMILIES[family]
    return entry.upstream(entry.config(**FAMILY_SMALL[family])).eval()


def family_model(family: str):
    """Ours, with the upstream weights (strict=True), max_seq_len FAMILY_MAX_LEN."""
    from gss_export.families import FAMILIES

    entry = FAMILIES[family]
    model = entry.model(entry.config(**FAMILY_SMALL[family], max_seq_len=FAMILY_MAX_LEN))
    model.load_state_dict(family_upstream(family).state_dict(), strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def family_exports(tmp_path_factory):
    """export(family, fmt) -> the folder of a validated export (made once per session and format)."""
    from gss_export.export import export_model

    made: dict = {}

    def export(family: str, fmt: str) -> Path:
        if (family, fmt) not in made:
            out = tmp_path_factory.mktemp(f"{family}_{fmt}")
            result = export_model(family_model(family), fmt, out)
            assert result.report.ok and (result.decoder_report is None or result.decoder_report.ok)
            made[family, fmt] = out
        return made[family, fmt]

    return export


@pytest.fixture(scope="session")
def family_references():
    """family -> the 24 greedy tokens upstream eager makes after LANG_PROMPT (full recompute)."""
    return {f: eager_greedy(family_upstream(f), LANG_PROMPT, LANG_NEW) for f in FAMILY_SMALL}


def prompt_path(family: str, n: int) -> str:
    """How the runtimes take an n-token prompt of `family`: through prefill above its measured threshold."""
    from gss_export.families import FAMILIES

    return "prefill" if n > FAMILIES[family].prefill_above else "step"
