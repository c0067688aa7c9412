"""Property-based: random command lines for gss-export and gss-run, in-process. Every one ends in a clear
message and exit 2, or a correct result; never a traceback or an internal error, and gss-run prints
nothing at all before it refuses an option."""
from __future__ import annotations

import json
import math
import sys

import pytest
from hypothesis import event, given, strategies as st

from conftest import run_cli
from tiny import TINY_MAX_LEN, fuzz, tiny_checkpoint, tiny_onnx

from gss_export.errors import GSSExportError
from gss_export.targets import TARGETS

JUNK = st.one_of(st.text(max_size=6), st.sampled_from(["", "-1", "0", "nan", "inf", "-inf", "1e400", "1,2", "x", "\udcff", "0x10"]))


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values five times in six, so that whole command lines often pass and run."""
    return st.one_of(*[valid] * 5, JUNK)


INT = mostly(st.integers(-1, 70).map(str))
FLOAT = mostly(st.floats(0, 1).map(str) | st.floats(-1, 2).map(str))
INT_LIST = mostly(st.lists(st.integers(1, 70), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))) |
                  st.lists(st.integers(-1, 70), max_size=4).map(lambda v: ",".join(map(str, v))))


def options(table: dict) -> st.SearchStrategy[list[str]]:
    """Any subset of `table`'s options (flag -> value strategy, or None for a bare flag), in any order."""
    picked = st.lists(st.sampled_from(sorted(table)), max_size=4, unique=True)

    def render(flags):
        parts = [st.just([f]) if table[f] is None else table[f].map(lambda v, f=f: [f, v]) for f in flags]
        return st.tuples(*parts).map(lambda groups: [a for g in groups for a in g])
    return picked.flatmap(render)


class Accepted(GSSExportError):
    """Raised where the build would start: every check passed."""

    exit_code = 99


@pytest.fixture
def no_build(monkeypatch):
    def build(*_, **__):
        raise Accepted("accepted")

    for target in {type(t) for t in TARGETS.values()}:
        monkeypatch.setattr(target, "build", build)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_inputs")
    (folder / "text.txt").write_text("held-out text " * 40)
    (folder / "empty.txt").write_bytes(b"")
    (folder / "ids.txt").write_text(" ".join(map(str, range(200))))
    (folder / "occupied").write_text("a file where the output folder would go")
    return {"pt": tiny_checkpoint(tmp_path_factory), "safetensors": tiny_checkpoint(tmp_path_factory, ".safetensors"),
            "missing": folder / "nope.pt", "folder": folder, **{p.stem: p for p in folder.iterdir()}}


EXPORT = {
    "--format": mostly(st.sampled_from(sorted(TARGETS))), "--opset": mostly(st.integers(16, 24).map(str)),
    "--conv": mostly(st.sampled_from(["auto", "direct", "fft", "monarch"])),
    "--max-seq-len": mostly(st.integers(1, 5000).map(str)), "--rtol": FLOAT, "--atol": FLOAT,
    "--batch-sizes": INT_LIST, "--lengths": INT_LIST, "--no-validate": None, "--external-data": None, "--inline": None,
    "--no-decoder": None, "--lambda-imag-exp": None, "--trust-pickle": None,
    "--dtype": mostly(st.sampled_from(["fp32", "fp16"])), "--quantize": mostly(st.just("int8")),
    "--int8-activations": mostly(st.sampled_from(["auto", "per-row", "per-tensor"])),
    "--int8-cpu": mostly(st.sampled_from(["auto", "vnni", "avx2"])), "--min-top1": FLOAT, "--max-kl": FLOAT,
    "--heldout-text": st.sampled_from(["text", "empty", "ids", "missing", "folder"]), "--heldout-length": INT,
}


@fuzz(100)
@given(ckpt=st.sampled_from(["pt", "safetensors"] * 3 + ["missing", "text"]), out=st.sampled_from(["fresh"] * 4 + ["occupied"]),
       args=options(EXPORT))
def test_gss_export_options(monkeypatch, capsys, no_build, inputs, tmp_path_factory, ckpt, out, args):
    args = [str(inputs[a]) if flag == "--heldout-text" and a in inputs else a
            for flag, a in zip([None] + args[:-1], args)]
    output = tmp_path_factory.mktemp("out") / "model" if out == "fresh" else inputs["occupied"]
    code, stdout, err = run_cli(monkeypatch, capsys, inputs[ckpt], "-o", output, *args)
    event(f"exit {code}")
    assert code in (2, 99), (code, args, stdout + err)
    assert "Traceback" not in stdout + err and "internal error" not in err
    assert len((stdout + err).strip().splitlines()) <= 25
    if code == 2:
        assert err.strip()
    pairs = list(zip(args, args[1:]))
    if any(flag in ("--rtol", "--atol", "--min-top1", "--max-kl") and not _finite_non_negative(v) for flag, v in pairs):
        assert code == 2, (args, err)  # a nan or negative tolerance would make every check fail (inf: pass)


def _finite_non_negative(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) >= 0
    except ValueError:
        return False


RUN = {
    "--max-new-tokens": mostly(st.integers(0, 12).map(str)), "--temperature": FLOAT, "--top-k": INT,
    "--filter-thres": FLOAT, "--top-p": FLOAT, "--seed": mostly(st.integers(0, 2**70).map(str)),
    "--eos-id": mostly(st.integers(0, 300).map(str)), "--stop": st.one_of(st.text(max_size=3), INT_LIST.map(lambda v: f"ids:{v}")),
    "--on-limit": mostly(st.sampled_from(["stop", "slide"])), "--next": INT,
    "--provider": mostly(st.just("cpu")), "--threads": mostly(st.sampled_from(["1", "2"])), "--json": None,
}
PROMPT = st.one_of(st.tuples(st.just("--prompt"), st.text(min_size=0, max_size=TINY_MAX_LEN + 2)).map(list),
                   st.tuples(st.just("--prompt-ids"), INT_LIST).map(list), st.just([]),
                   st.tuples(st.just("--prompt"), st.text(min_size=1, max_size=10)).map(list),
                   st.tuples(st.just("--prompt"), st.text(max_size=3), st.just("--prompt-ids"), INT_LIST).map(list))


def gss_run(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from gss_runtime.cli import main

    monkeypatch.setattr(sys, "argv", ["gss-run", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@fuzz(120)
@given(prompt=PROMPT, args=options(RUN))
def test_gss_run_options(monkeypatch, capsys, tmp_path_factory, prompt, args):
    # "--provider cuda" would be a clear error or CUDA: both fine, but the probe costs seconds
    args = [a if a != "cuda" else "cpu" for a in args]
    code, stdout, err = gss_run(monkeypatch, capsys, tiny_onnx(tmp_path_factory), *prompt, *args)
    event(f"exit {code}")
    assert code in (0, 2), (code, prompt, args, err)
    assert "Traceback" not in stdout + err and "internal error" not in err
    if code == 2:
        assert stdout == "" and err.strip() and len(err.strip().splitlines()) <= 12, (prompt, args, stdout, err)
    elif "--json" in args:
        json.loads(stdout)
