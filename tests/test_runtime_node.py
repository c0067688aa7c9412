"""runtime/node/generate.js (onnxruntime-node) against upstream eager, and its handling of bad arguments."""
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

NODE_DIR = Path(__file__).resolve().parent.parent / "runtime" / "node"
GENERATE = NODE_DIR / "generate.js"
FAMILIES = ("gss", "mhesa")  # the recurrent ones, beside the example's dsconv


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, once runtime/node's packages are installed (session scope: skips before the export)."""
    require(None not in (shutil.which("node"), shutil.which("npm")), "node/npm not found: install Node.js 20+ with npm")
    require((NODE_DIR / "node_modules" / "onnxruntime-node").is_dir(),
            "runtime/node has no node_modules: run `npm ci --prefix runtime/node`")
    return shutil.which("node")


def generate(node: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([node, GENERATE, *map(str, args)], capture_output=True, text=True, timeout=300)


def ids(values) -> str:
    return ",".join(map(str, values))


def test_node_greedy_matches_eager(node, example_onnx, lang_reference):
    proc = generate(node, example_onnx, "--prompt-ids", ids(LANG_PROMPT), "--max-new-tokens", LANG_NEW, "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and json.loads(proc.stdout) == {"tokens": lang_reference, "prompt": "step", "family": "dsconv"}


def test_node_long_prompt_goes_through_prefill(node, example_onnx, long_reference):
    """A 300-token prompt goes through prefill.onnx in one call: the same tokens as eager."""
    proc = generate(node, example_onnx, "--prompt-ids", ids(LONG_PROMPT), "--max-new-tokens", LANG_NEW)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"tokens": long_reference, "prompt": "prefill", "family": "dsconv"}


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
    assert json.loads(proc.stdout) == {"tokens": want, "prompt": "step", "family": "dsconv"}


@functools.cache
def family_eager(family: str, prompt: tuple, new: int) -> list[int]:
    return eager_greedy(family_upstream(family), prompt, new)


@pytest.mark.parametrize("family", FAMILIES)
def test_node_family_greedy_matches_eager(family, node, family_exports, family_references):
    """A recurrent family's state (replaced by each call, read from config.json): the same tokens as eager."""
    proc = generate(node, family_exports(family, "onnx"), "--prompt-ids", ids(LANG_PROMPT), "--max-new-tokens", LANG_NEW,
                    "--threads", 2)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"tokens": family_references[family], "prompt": prompt_path(family, len(LANG_PROMPT)), "family": family}


@pytest.mark.parametrize("family", FAMILIES)
def test_node_family_long_prompt_goes_through_prefill(family, node, family_exports):
    proc = generate(node, family_exports(family, "onnx"), "--prompt-ids", ids(LONG_PROMPT), "--max-new-tokens", LANG_NEW)
    assert proc.returncode == 0, proc.stderr
    want = family_eager(family, tuple(LONG_PROMPT), LANG_NEW)
    assert json.loads(proc.stdout) == {"tokens": want, "prompt": "prefill", "family": family}


@pytest.mark.parametrize("family", FAMILIES)
def test_node_family_context_beyond_max_seq_len(family, node, family_exports):
    """A recurrent state has no limit on the context: a prompt longer than max_seq_len goes through
    prefill.onnx in calls of at most max_seq_len tokens, and the tokens after it are still eager's."""
    prompt = np.random.default_rng(5).integers(0, 256, FAMILY_MAX_LEN + 50).tolist()
    proc = generate(node, family_exports(family, "onnx"), "--prompt-ids", ids(prompt), "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"tokens": family_eager(family, tuple(prompt), 8), "prompt": "prefill", "family": family}


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
