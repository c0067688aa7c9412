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


BPE_CHAT = EXAMPLE.parent.parent / "bpe_chat"
CHAT_SPECIALS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")


def test_bpe_chat_example_tokenizer_fits_checkpoint_and_answers():
    """The bundled example with a real tokenizer (examples/bpe_chat): the tokenizer has its special tokens and a
    chat template, its vocabulary is the checkpoint's num_tokens, and the checkpoint strict-loads into upstream's
    GatedStateSpacesLM and answers a chat-formatted question with the topic's documentation text."""
    import torch
    from gated_state_spaces_pytorch import GatedStateSpacesLM
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from conftest import eager_greedy

    sandbox = pytest.importorskip("jinja2.sandbox")
    tokenizer = Tokenizer.from_file(str(BPE_CHAT / "tokenizer.json"))
    settings = json.loads((BPE_CHAT / "tokenizer_config.json").read_text())
    special = json.loads((BPE_CHAT / "special_tokens_map.json").read_text())
    assert settings["eos_token"] == special["eos_token"] == "<|endoftext|>" and settings["model_max_length"] == 2048
    assert [tokenizer.token_to_id(t) for t in CHAT_SPECIALS] == [0, 1, 2, 3]
    assert tokenizer.decode([tokenizer.token_to_id("Ġstatement")]) == " statement"  # byte-level BPE

    # Hugging Face's convention: a jinja2 template over messages and add_generation_prompt
    template = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(settings["chat_template"])
    with_system = template.render(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "assert"}],
                                  add_generation_prompt=True)
    assert with_system == "<|system|>Be brief.<|endoftext|><|user|>assert<|endoftext|><|assistant|>"
    system_ids = tokenizer.encode(with_system, add_special_tokens=False).ids
    assert system_ids[0] == 1 and system_ids[-1] == 3 and system_ids.count(0) == 2
    prompt = template.render(messages=[{"role": "user", "content": "assert"}], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    assert prompt_ids == system_ids[system_ids.index(2):]

    training = json.loads((BPE_CHAT / "training.json").read_text())
    state = load_file(str(BPE_CHAT / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values())
    num_tokens = state["token_emb.weight"].shape[0]
    assert tokenizer.get_vocab_size(with_added_tokens=True) == num_tokens == training["config"]["num_tokens"]
    model = GatedStateSpacesLM(**training["config"]).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids]))
    assert logits.shape == (1, len(prompt_ids), num_tokens) and torch.isfinite(logits).all()
    # greedy, upstream-style: a training topic's text (memorised; training.json records the held-out loss)
    text = tokenizer.decode(eager_greedy(model, prompt_ids, 12))
    assert text.startswith('The "assert" statement\n'), text
