"""The runtime as its own distribution: a fresh venv with only `gss-runtime` (numpy and onnxruntime)
generates from an exported folder exactly what upstream eager does, with no torch or export toolchain."""
from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

from conftest import LANG_NEW, LONG_PROMPT

ROOT = Path(__file__).resolve().parent.parent
MAX_SITE_PACKAGES_MB = 200
EXPORT_TOOLCHAIN = ("torch", "onnx", "onnxscript", "typer", "gss-export")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A new venv holding gss-runtime and what it depends on, nothing else."""
    env = tmp_path_factory.mktemp("runtime_venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT / "runtime")]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def test_runtime_venv_holds_no_export_toolchain_and_is_small(runtime_venv):
    listed = subprocess.run([str(runtime_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, timeout=120)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"gss-runtime", "numpy", "onnxruntime"} <= names, names
    assert not names & set(EXPORT_TOOLCHAIN), names & set(EXPORT_TOOLCHAIN)
    (site,) = (runtime_venv / "lib").glob("python3*/site-packages")
    size = folder_mb(site)
    print(f"\nruntime-only venv: {size:.0f} MB of site-packages: {', '.join(sorted(names))}")
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
