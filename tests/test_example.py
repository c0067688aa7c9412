"""The README's main job: export the bundled example checkpoint and ask the runtime for next bytes."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import EXAMPLE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("byte_lm")
    proc = subprocess.run(["gss-export", EXAMPLE, "--output", out], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_example_exports_and_validates(exported):
    out, proc = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == {"family": "dsconv", "num_tokens": 256, "dim": 128, "depth": 3, "heads": 4, "dim_dsconv": 128,
                               "dim_expansion_factor": 2, "max_seq_len": 2048}
    rows = config["validation"]["rows"]
    assert config["validation"]["ok"] and {r["length"] for r in rows} >= {1, 2, 7, 127, 128, 129, 1000, 2048}
    assert max(r["max_rel"] for r in rows) <= 1e-4


def run_json(out, *options: str) -> dict:
    """gss-run on the exported example with the README's prompt and --json; its one JSON object."""
    proc = subprocess.run(["gss-run", out, "--prompt", "The for statement", *options, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_runtime_predicts_documentation_text(exported):
    result = run_json(exported[0], "--next", "5")
    assert result["prompt_ids"] == list(b"The for statement")
    # a trained model, not noise: after "statement" the likely bytes are a space or punctuation
    assert result["next"][0]["text"] in (" ", ",", ".") and result["next"][0]["prob"] > 0.2


def test_readme_generation_makes_documentation_like_text(exported):
    result = run_json(exported[0], "--max-new-tokens", "120")
    assert len(result["tokens"]) == 120 and result["stop_reason"] == "max_new_tokens"
    text = result["text"]
    # greedy bytes from a model trained on the Python docs: mostly lowercase words separated by spaces
    words = text.split()
    assert len(words) >= 10 and sum(w.isascii() for w in words) == len(words), text


GSS_EXAMPLE = EXAMPLE.parent.parent / "byte_gss" / "model.safetensors"


def test_gss_example_exports_and_generates_like_upstream(tmp_path):
    """The bundled GatedStateSpacesLM: validated export, and gss-run's greedy bytes equal upstream eager's
    full recompute."""
    import torch
    from gated_state_spaces_pytorch import GatedStateSpacesLM
    from safetensors.torch import load_file

    from conftest import eager_greedy

    proc = subprocess.run(["gss-export", GSS_EXAMPLE, "--output", tmp_path], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "GatedStateSpacesLM" in proc.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == {"family": "gss", "num_tokens": 256, "dim": 128, "depth": 3, "dss_kernel_N": 64, "dss_kernel_H": 128,
                               "dim_expansion_factor": 2, "dss_kernel_lambda_imag_exp": True, "max_seq_len": 2048}
    assert config["validation"]["ok"] and config["decoder_validation"]["ok"]
    result = run_json(tmp_path, "--max-new-tokens", "60")
    upstream = GatedStateSpacesLM(num_tokens=256, dim=128, depth=3, dss_kernel_N=64, dss_kernel_H=128, dim_expansion_factor=2).eval()
    upstream.load_state_dict(load_file(str(GSS_EXAMPLE)), strict=True)
    torch.manual_seed(0)
    assert result["tokens"] == eager_greedy(upstream, list(b"The for statement"), 60)
    assert result["text"].startswith(" is used for")  # a trained model: documentation-like text
