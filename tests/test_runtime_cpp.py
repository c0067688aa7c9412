"""runtime/cpp: build the libtorch example with CMake, generate from the exported example and from the
recurrent families' small exports, compare with eager."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils

from conftest import FAMILY_MAX_LEN, LANG_NEW, LANG_PROMPT, LONG_PROMPT, eager_greedy, export_example, family_upstream, require, prompt_path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "runtime" / "cpp"
BUILD = ROOT / "build" / "cpp"  # ignored by git; a rebuild with nothing changed is a no-op


def run(cmd: list, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exe() -> Path:
    require(shutil.which("cmake") is not None and shutil.which("c++") is not None, "cmake and a C++ compiler are needed (apt-get install cmake g++)")
    configure = run(["cmake", "-S", SOURCE, "-B", BUILD, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"])
    require("CLI11 (argument parsing) not found" not in configure.stderr, "CLI11 is needed: apt-get install libcli11-dev")
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    build = run(["cmake", "--build", BUILD, "-j2"])
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return BUILD / "gss_generate"


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    return export_example(tmp_path_factory, "torchscript")


@pytest.fixture(scope="module")
def model_aoti(tmp_path_factory) -> Path:
    return export_example(tmp_path_factory, "aoti")


def generate(exe: Path, model: Path, *options: str, prompt=LANG_PROMPT) -> dict:
    ids = ",".join(map(str, prompt))
    proc = run([exe, model, "--prompt-ids", ids, "--max-new-tokens", str(LANG_NEW), *options], timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # one JSON line, nothing else on stdout
    return json.loads(lines[0])


def test_incremental_greedy_equals_eager(exe, model_pt, lang_reference):
    result = generate(exe, model_pt, "--threads", "2")
    assert result == {"tokens": lang_reference, "format": "torchscript", "decoding": "incremental", "prompt": "step", "family": "dsconv"}



def test_a_long_generation_grows_its_room_and_stays_exact(exe, model_pt, example_upstream):
    """600 tokens after a short prompt: the state keeps 256 slots of room past the prompt (a step multiplies
    the room too) and grows by as much twice; the tokens are eager's."""
    ids = ",".join(map(str, LANG_PROMPT))
    proc = run([exe, model_pt, "--prompt-ids", ids, "--max-new-tokens", "600", "--threads", "2"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == eager_greedy(example_upstream, LANG_PROMPT, 600)

def test_full_recompute_and_model_file_path_agree(exe, model_pt, lang_reference):
    result = generate(exe, model_pt / "model.pt", "--full-recompute")
    assert result == {"tokens": lang_reference, "format": "torchscript", "decoding": "full-recompute", "prompt": "forward", "family": "dsconv"}


def test_aoti_package_incremental_and_full_equal_eager(exe, model_aoti, lang_reference):
    assert generate(exe, model_aoti) == {"tokens": lang_reference, "format": "aoti", "decoding": "incremental", "prompt": "step", "family": "dsconv"}
    full = generate(exe, model_aoti / "model.pt2", "--full-recompute")
    assert full == {"tokens": lang_reference, "format": "aoti", "decoding": "full-recompute", "prompt": "forward", "family": "dsconv"}


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_long_prompt_goes_through_prefill(exe, model_pt, model_aoti, long_reference, fmt):
    """A 300-token prompt: one prefill call (full-sequence convolution), then steps; equal to eager."""
    result = generate(exe, model_pt if fmt == "torchscript" else model_aoti, prompt=LONG_PROMPT)
    assert result == {"tokens": long_reference, "format": fmt, "decoding": "incremental", "prompt": "prefill", "family": "dsconv"}


# ---- the recurrent families (a fixed-size state replaced at each step) -----------------------------
RECURRENT = ["gss", "mhesa"]
FORMATS = ["torchscript", "aoti"]
# past max_seq_len: incremental decoding of a recurrent family has no context limit, the prompt goes
# through prefill in pieces of at most max_seq_len
BEYOND = (LONG_PROMPT * 4)[: FAMILY_MAX_LEN + 100]


@pytest.fixture(scope="module")
def recurrent_references():
    """(family, prompt name) -> upstream eager's 24 greedy tokens, computed on first use."""
    made: dict = {}

    def reference(family: str, name: str) -> list[int]:
        if (family, name) not in made:
            made[family, name] = eager_greedy(family_upstream(family), {"long": LONG_PROMPT, "beyond": BEYOND}[name], LANG_NEW)
        return made[family, name]

    return reference


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", RECURRENT)
def test_recurrent_incremental_and_full_equal_eager(exe, family_exports, family_references, family, fmt):
    model = family_exports(family, fmt)
    want = {"tokens": family_references[family], "format": fmt, "family": family}
    assert generate(exe, model, "--threads", "2") == {**want, "decoding": "incremental", "prompt": prompt_path(family, len(LANG_PROMPT))}
    full = generate(exe, model / ("model.pt" if fmt == "torchscript" else "model.pt2"), "--full-recompute")
    assert full == {**want, "decoding": "full-recompute", "prompt": "forward"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", RECURRENT)
def test_recurrent_long_prompt_goes_through_prefill(exe, family_exports, recurrent_references, family, fmt):
    result = generate(exe, family_exports(family, fmt), prompt=LONG_PROMPT)
    assert result == {"tokens": recurrent_references(family, "long"), "format": fmt, "decoding": "incremental", "prompt": "prefill",
                      "family": family}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", RECURRENT)
def test_recurrent_prompt_beyond_max_seq_len(exe, family_exports, recurrent_references, family, fmt):
    """Only a single call is bounded: a prompt longer than max_seq_len decodes incrementally, equal to
    eager (upstream has no limit); the full recompute is refused with the reason."""
    model = family_exports(family, fmt)
    result = generate(exe, model, prompt=BEYOND)
    assert result == {"tokens": recurrent_references(family, "beyond"), "format": fmt, "decoding": "incremental", "prompt": "prefill",
                      "family": family}
    proc = run([exe, model, "--prompt-ids", ",".join(map(str, BEYOND)), "--max-new-tokens", "3", "--full-recompute"], timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"exceed the model's max_seq_len {FAMILY_MAX_LEN} (a limit of --full-recompute only" in proc.stderr, proc.stderr


def test_pt2_archive_is_refused_with_the_way_out(exe, tmp_path_factory):
    proc = run([exe, export_example(tmp_path_factory, "pt2"), "--prompt-ids", "1", "--max-new-tokens", "2"], timeout=60)
    assert proc.returncode == 2 and "not a gss-export AOTInductor package" in proc.stderr and "--format aoti" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["{model}", "--max-new-tokens", "3"], "--prompt-ids is required"),
        (["{model}", "--prompt-ids", "1,x", "--max-new-tokens", "3"], "Could not convert"),
        (["{model}", "--prompt-ids", "1,256", "--max-new-tokens", "3"], "token id 256 is out of range: ids are 0..255"),
        (["{model}", "--prompt-ids", "1", "--max-new-tokens", "0"], "not in range 1"),
        (["{model}", "--prompt-ids", "1,2", "--max-new-tokens", "2047"], "exceed the model's max_seq_len 2048"),
        (["{model}", "--prompt-ids", "1", "--max-new-tokens", "3", "--bogus"], "not expected: --bogus"),
        (["{model}/missing", "--prompt-ids", "1", "--max-new-tokens", "3"], "no such model"),
        (["{model}/config.json", "--prompt-ids", "1", "--max-new-tokens", "3"], "is not a TorchScript file"),
    ],
)
def test_bad_arguments_get_one_clear_line(exe, model_pt, args, message):
    proc = run([exe, *(a.replace("{model}", str(model_pt)) for a in args)], timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    assert message in proc.stderr and len(proc.stderr.splitlines()) <= 2, proc.stderr
