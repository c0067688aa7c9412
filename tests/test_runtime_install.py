"""The runtime as its own distribution: a fresh venv with only `gss-runtime` (numpy, onnxruntime and
tokenizers) generates from an exported folder exactly what upstream eager does, ids or text, with no torch or
export toolchain."""
from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

from conftest import LANG_NEW, LONG_PROMPT

ROOT = Path(__file__).resolve().parent.parent
# What `pip install gss-runtime` adds to a new venv's site-packages: 200 MB, of which onnxruntime 80, numpy 71,
# tokenizers 12 and the huggingface_hub chain tokenizers requires (never imported here) 31. The venv's own pip
# (and, before Python 3.12, setuptools) is measured before the install and not counted. The bound leaves a
# patch release's room above that.
MAX_SITE_PACKAGES_MB = 215
EXPORT_TOOLCHAIN = ("torch", "onnx", "onnxscript", "typer", "gss-export")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def site_packages(env: Path) -> Path:
    (site,) = (env / "lib").glob("python3*/site-packages")
    return site


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A new venv holding gss-runtime and what it depends on, nothing else; `seed_mb` in it records the
    size of the bare venv's site-packages before the install."""
    env = tmp_path_factory.mktemp("runtime_venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    (env / "seed_mb").write_text(f"{folder_mb(site_packages(env)):.3f}")
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT / "runtime")]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def test_runtime_venv_holds_no_export_toolchain_and_is_small(runtime_venv):
    listed = subprocess.run([str(runtime_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, timeout=120)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"gss-runtime", "numpy", "onnxruntime", "tokenizers"} <= names, names
    assert not names & set(EXPORT_TOOLCHAIN), names & set(EXPORT_TOOLCHAIN)
    seed = float((runtime_venv / "seed_mb").read_text())
    size = folder_mb(site_packages(runtime_venv)) - seed
    print(f"\nruntime-only install: {size:.0f} MB added to site-packages (the bare venv's pip: {seed:.0f} MB): "
          f"{', '.join(sorted(names))}")
    assert size <= MAX_SITE_PACKAGES_MB


def test_gss_run_from_the_runtime_venv_equals_eager(runtime_venv, example_onnx, long_reference):
    """gss-run of that venv on the exported example (a 300-token prompt: prefill.onnx, then steps); the
    reference comes from this process, which has torch and the upstream package."""
    ids = ",".join(map(str, LONG_PROMPT))
    proc = subprocess.run([str(runtime_venv / "bin" / "gss-run"), str(example_onnx), "--prompt-ids", ids,
                           "--max-new-tokens", str(LANG_NEW), "--provider", "cpu", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["tokens"] == long_reference
    assert "Traceback" not in proc.stderr


def test_text_from_the_runtime_venv_equals_eager(runtime_venv, tmp_path_factory):
    """A model exported with its Hugging Face tokenizer: gss-run of that venv takes text and gives the text of
    eager's greedy ids."""
    from text_support import EOS, PROMPTS, eager_greedy_ids, text_export

    from tokenizers import Tokenizer

    out = text_export(tmp_path_factory, "dsconv")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    proc = subprocess.run([str(runtime_venv / "bin" / "gss-run"), str(out), "--prompt", PROMPTS[1], "--max-new-tokens",
                           "24", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = eager_greedy_ids("dsconv", tok.encode(PROMPTS[1]).ids, 24, tok.token_to_id(EOS))
    assert json.loads(proc.stdout)["text"] == tok.decode(want, skip_special_tokens=True)
