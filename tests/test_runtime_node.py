"""runtime/node/generate.js (onnxruntime-node) against upstream eager, text through an export's tokenizer
(@huggingface/tokenizers) against Python's `tokenizers`, and its handling of bad arguments."""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import FAMILY_MAX_LEN, LANG_NEW, LANG_PROMPT, LONG_PROMPT, eager_greedy, family_upstream, require, prompt_path
from text_support import EOS, eager_greedy_ids, text_export, tokenizer_folder

NODE_DIR = Path(__file__).resolve().parent.parent / "runtime" / "node"
GENERATE = NODE_DIR / "generate.js"
FAMILIES = ("gss", "mhesa")  # the recurrent ones, beside the example's dsconv


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, once runtime/node's packages are installed (session scope: skips before the export)."""
    require(None not in (shutil.which("node"), shutil.which("npm")), "node/npm not found: install Node.js 20+ with npm")
    require(all((NODE_DIR / "node_modules" / p).is_dir() for p in ("onnxruntime-node", "@huggingface/tokenizers")),
            "runtime/node's packages are missing or out of date: run `npm ci --prefix runtime/node`")
    return shutil.which("node")


def generate(node: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([node, GENERATE, *map(str, args)], capture_output=True, text=True, timeout=300)


def ids(values) -> str:
    return ",".join(map(str, values))


def as_bytes(reference: list[int]) -> dict:
    """What generate.js prints beside the ids for a byte-level model: their UTF-8 text, and why it stopped."""
    return {"tokens": reference, "text": bytes(reference).decode("utf-8", "replace"), "stop_reason": "max_new_tokens"}


def test_node_greedy_matches_eager(node, example_onnx, lang_reference):
    proc = generate(node, example_onnx, "--prompt-ids", ids(LANG_PROMPT), "--max-new-tokens", LANG_NEW, "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    assert json.loads(proc.stdout) == {**as_bytes(lang_reference), "prompt": "step", "family": "dsconv"}


def test_node_long_prompt_goes_through_prefill(node, example_onnx, long_reference):
    """A 300-token prompt goes through prefill.onnx in one call: the same tokens as eager."""
    proc = generate(node, example_onnx, "--prompt-ids", ids(LONG_PROMPT), "--max-new-tokens", LANG_NEW)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {**as_bytes(long_reference), "prompt": "prefill", "family": "dsconv"}



def test_node_long_generation_grows_its_room_and_stays_exact(node, example_onnx, example_upstream):
    """600 tokens after a short prompt: the state keeps 256 slots of room past the prompt (a step multiplies
    the room too), grows by as much twice, head by head for u, and the tokens are eager's."""
    proc = generate(node, example_onnx, "--prompt-ids", ids(LANG_PROMPT), "--max-new-tokens", 600, "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == eager_greedy(example_upstream, LANG_PROMPT, 600)

def test_node_without_prefill_chunks_the_prompt(node, example_onnx, tmp_path):
    """An export without prefill.onnx (made before it existed): the prompt in chunks of 256 through
    decoder.onnx, the same tokens as the Python runtime."""
    import shutil

    from gss_runtime.generate import Generator

    old = tmp_path / "old"
    shutil.copytree(example_onnx, old)
    (old / "prefill.onnx").unlink()
    config = json.loads((old / "config.json").read_text())
    del config["export"]["prefill"]
    (old / "config.json").write_text(json.dumps(config))
    prompt = np.random.default_rng(3).integers(0, 256, 300).tolist()
    want = Generator(old, provider="cpu").generate(prompt, 8).tokens[0]
    proc = generate(node, old, "--prompt-ids", ids(prompt), "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {**as_bytes(want), "prompt": "step", "family": "dsconv"}


@functools.cache
def family_eager(family: str, prompt: tuple, new: int) -> list[int]:
    return eager_greedy(family_upstream(family), prompt, new)


@pytest.mark.parametrize("family", FAMILIES)
def test_node_family_greedy_matches_eager(family, node, family_exports, family_references):
    """A recurrent family's state (replaced by each call, read from config.json): the same tokens as eager."""
    proc = generate(node, family_exports(family, "onnx"), "--prompt-ids", ids(LANG_PROMPT), "--max-new-tokens", LANG_NEW,
                    "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {**as_bytes(family_references[family]), "prompt": prompt_path(family, len(LANG_PROMPT)),
                                       "family": family}


@pytest.mark.parametrize("family", FAMILIES)
def test_node_family_long_prompt_goes_through_prefill(family, node, family_exports):
    proc = generate(node, family_exports(family, "onnx"), "--prompt-ids", ids(LONG_PROMPT), "--max-new-tokens", LANG_NEW)
    assert proc.returncode == 0, proc.stderr
    want = family_eager(family, tuple(LONG_PROMPT), LANG_NEW)
    assert json.loads(proc.stdout) == {**as_bytes(want), "prompt": "prefill", "family": family}


@pytest.mark.parametrize("family", FAMILIES)
def test_node_family_context_beyond_max_seq_len(family, node, family_exports):
    """A recurrent state has no limit on the context: a prompt longer than max_seq_len goes through
    prefill.onnx in calls of at most max_seq_len tokens, and the tokens after it are still eager's."""
    prompt = np.random.default_rng(5).integers(0, 256, FAMILY_MAX_LEN + 50).tolist()
    proc = generate(node, family_exports(family, "onnx"), "--prompt-ids", ids(prompt), "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {**as_bytes(family_eager(family, tuple(prompt), 8)), "prompt": "prefill", "family": family}


# ---- text through the export's tokenizer (gss-export --tokenizer) ----------------------------------------
TEXT_FAMILIES = ("dsconv", "mhesa")  # one of each kind of state (appended, replaced)
TEXT_PROMPTS = ("café 日本", "🙂 emoji")  # multi-byte characters: single tokens end inside them
TEXT_NEW = 24


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    """Python's `tokenizers` reading the trained tokenizer that the text exports carry."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_folder(tmp_path_factory) / "tokenizer.json"))


def text_reference(tok, family: str, prompt: str, new: int = TEXT_NEW, eos: int | None | str = EOS) -> tuple[list[int], str]:
    """Upstream eager's greedy ids after the prompt as Python encodes it (stopping before the tokenizer's eos
    token, or `eos` when it is an id), and their text as Python's `tokenizers` decodes it."""
    eos_id = tok.token_to_id(eos) if isinstance(eos, str) else eos
    made = eager_greedy_ids(family, tok.encode(prompt, add_special_tokens=True).ids, new, eos_id)
    return made, tok.decode(made, skip_special_tokens=True)


def streamed(proc: subprocess.CompletedProcess) -> tuple[str, dict]:
    """--stream's output: the text written as it came (ended by a newline), then the JSON line."""
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n")
    text, _, line = proc.stdout[:-1].rpartition("\n")
    return text, json.loads(line)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_node_text_greedy_matches_eager_decoded(family, node, text_tokenizer, tmp_path_factory):
    """--prompt TEXT through the export's tokenizer: the ids are upstream eager's (stopping at the tokenizer's
    eos), the text is theirs decoded by Python's `tokenizers`, and the streamed text equals it."""
    model = text_export(tmp_path_factory, family)
    for prompt in TEXT_PROMPTS:
        want, text = text_reference(text_tokenizer, family, prompt)
        shown, result = streamed(generate(node, model, "--prompt", prompt, "--max-new-tokens", TEXT_NEW, "--stream", "--threads", 2))
        assert result == {"tokens": want, "text": text, "stop_reason": "max_new_tokens" if len(want) == TEXT_NEW else "eos",
                          "prompt": "step", "family": family}, prompt
        assert shown == text, prompt


def with_tokenizer_change(source: Path, target: Path, eos: str | None = None, drop: bool = False) -> Path:
    """A copy of a text export whose tokenizer's eos token is `eos` (config.json's record and the tokenizer's
    files), or which has no tokenizer at all (`drop`: ids only)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    if drop:
        for name in config["tokenizer"]["files"]:
            (target / name).unlink()
        config["tokenizer"] = None
    else:
        from tokenizers import Tokenizer

        config["tokenizer"].update(eos_token=eos, eos_token_id=Tokenizer.from_file(str(target / "tokenizer.json")).token_to_id(eos))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            (target / name).write_text(json.dumps({**json.loads((target / name).read_text()), "eos_token": eos}))
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_node_text_stops_at_the_tokenizers_eos(node, text_tokenizer, tmp_path_factory, tmp_path):
    """The tokenizer's eos token ends generation (not printed) unless --ignore-eos; --eos-id overrides it. The
    eos token here is one greedy decoding reaches, so that stopping shows."""
    family, prompt = "mhesa", TEXT_PROMPTS[0]
    full, _ = text_reference(text_tokenizer, family, prompt, eos=None)
    stop = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    model = with_tokenizer_change(text_export(tmp_path_factory, family), tmp_path / "eos", eos=text_tokenizer.id_to_token(full[stop]))
    want, text = text_reference(text_tokenizer, family, prompt, eos=full[stop])
    assert want == full[:stop]
    shown, result = streamed(generate(node, model, "--prompt", prompt, "--max-new-tokens", TEXT_NEW, "--stream"))
    assert (result["tokens"], result["text"], result["stop_reason"], shown) == (want, text, "eos", text)
    result = json.loads(generate(node, model, "--prompt", prompt, "--max-new-tokens", TEXT_NEW, "--ignore-eos").stdout)
    assert (result["tokens"], result["stop_reason"]) == (full, "max_new_tokens")
    result = json.loads(generate(node, model, "--prompt", prompt, "--max-new-tokens", TEXT_NEW, "--eos-id", full[1]).stdout)
    assert (result["tokens"], result["stop_reason"]) == (full[:full.index(full[1])], "eos")


def test_node_text_prompt_needs_text(node, text_tokenizer, tmp_path_factory, tmp_path, example_onnx, lang_reference):
    """--prompt is UTF-8 bytes for a byte-level model, and a clear error for a model of ids only (no tokenizer,
    num_tokens not 256), which still takes --prompt-ids and prints text null."""
    shown, result = streamed(generate(node, example_onnx, "--prompt", bytes(LANG_PROMPT).decode(), "--max-new-tokens", LANG_NEW,
                                      "--stream"))
    assert result == {**as_bytes(lang_reference), "prompt": "step", "family": "dsconv"} and shown == result["text"]
    model = with_tokenizer_change(text_export(tmp_path_factory, "mhesa"), tmp_path / "ids", drop=True)
    for args, message in [(["--prompt", "café"], "--prompt takes text, but this model has no text (num_tokens 512"),
                          (["--prompt-ids", "1,2", "--stream"], "--stream writes text, but this model has no text")]:
        proc = generate(node, model, *args, "--max-new-tokens", 4)
        assert proc.returncode == 2 and message in proc.stderr and proc.stdout == "", proc.stderr
    prompt = text_tokenizer.encode(TEXT_PROMPTS[1]).ids
    proc = generate(node, model, "--prompt-ids", ids(prompt), "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"tokens": eager_greedy_ids("mhesa", prompt, 8), "text": None, "stop_reason": "max_new_tokens",
                                       "prompt": "step", "family": "mhesa"}


BAD = {
    "no arguments": ([], "expected one MODEL_DIR"),
    "missing model dir": (["/nonexistent/gss", "--prompt-ids", "1", "--max-new-tokens", "2"], "does not exist"),
    "missing decoder.onnx": (["EMPTY", "--prompt-ids", "1", "--max-new-tokens", "2"], "has no decoder.onnx"),
    "non-integer id": (["MODEL", "--prompt-ids", "1,x", "--max-new-tokens", "2"], "is not an integer"),
    "id too large": (["MODEL", "--prompt-ids", "1,256", "--max-new-tokens", "2"], "ids must be in [0, 256)"),
    "negative id": (["MODEL", "--prompt-ids=-1", "--max-new-tokens", "2"], "ids must be in [0, 256)"),
    "empty prompt": (["MODEL", "--prompt-ids=", "--max-new-tokens", "2"], "prompt is empty"),
    "zero new tokens": (["MODEL", "--prompt-ids", "1", "--max-new-tokens", "0"], "positive integer"),
    "fractional new tokens": (["MODEL", "--prompt-ids", "1", "--max-new-tokens", "2.5"], "positive integer"),
    "missing new tokens": (["MODEL", "--prompt-ids", "1"], "--max-new-tokens is required"),
    "too long": (["MODEL", "--prompt-ids", "1,2", "--max-new-tokens", "2047"], "exceeds the model's max_seq_len 2048"),
    "unknown flag": (["MODEL", "--prompt-ids", "1", "--max-new-tokens", "2", "--temperature", "1"], "Unknown option '--temperature'"),
    "bad threads": (["MODEL", "--prompt-ids", "1", "--max-new-tokens", "2", "--threads", "0"], "--threads must be a positive integer"),
    "both prompts": (["MODEL", "--prompt", "a", "--prompt-ids", "1", "--max-new-tokens", "2"], "give exactly one of --prompt"),
    "eos id too large": (["MODEL", "--prompt", "a", "--max-new-tokens", "2", "--eos-id", "256"], "eos id 256 is not a token id in [0, 256)"),
    "eos id and ignore": (["MODEL", "--prompt", "a", "--max-new-tokens", "2", "--eos-id", "1", "--ignore-eos"], "at most one of --eos-id"),
}


@pytest.mark.parametrize("case", BAD)
def test_node_bad_arguments_give_one_clear_message(case, node, example_onnx, tmp_path):
    args, message = BAD[case]
    args = [{"MODEL": example_onnx, "EMPTY": tmp_path}.get(a, a) for a in args]
    proc = generate(node, *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert message in proc.stderr and proc.stdout == ""
    assert not re.search(r"^\s+at ", proc.stderr, re.M), proc.stderr  # no stack trace
    assert len(proc.stderr.splitlines()) <= 20, proc.stderr  # fits one screen


def test_node_and_python_refuse_an_export_with_the_old_slot_major_past(node, example_onnx, tmp_path):
    """A GatedDsConvLM export made before the past became head-major (no export.decoder.past_layout in
    config.json, none in the decoder's metadata): both runtimes refuse it in one line that says to re-export."""
    import shutil

    import onnx

    from gss_runtime.decoder import Decoder
    from gss_runtime.errors import RuntimeInputError

    old = tmp_path / "old"
    shutil.copytree(example_onnx, old)
    config = json.loads((old / "config.json").read_text())
    del config["export"]["decoder"]["past_layout"]
    (old / "config.json").write_text(json.dumps(config))
    proc = generate(node, old, "--prompt-ids", "1,2", "--max-new-tokens", 2)
    assert proc.returncode == 2 and "re-export it with gss-export" in proc.stderr and proc.stdout == "", proc.stderr
    for name in ("decoder.onnx", "prefill.onnx"):
        graph = onnx.load(str(old / name))
        kept = [p for p in graph.metadata_props if p.key != "gss_export.past_layout"]
        del graph.metadata_props[:]
        graph.metadata_props.extend(kept)
        onnx.save(graph, str(old / name))
    with pytest.raises(RuntimeInputError, match="re-export it with gss-export"):
        Decoder(old, provider="cpu")
