"""OpenVINO as a second backend: the same model.onnx, decoder.onnx and prefill.onnx, every family.

- `gss-export --openvino` validates f32 on OpenVINO at the default shapes (forward) and the decoder cases
  (decoder and prefill), 1e-4 relative, and measures bf16 on held-out text into config.json;
- greedy generation on OpenVINO equals upstream eager's tokens;
- gss-serve's exactness tests (imported from test_serve.py and test_serve_scoring.py) pass on servers
  started with `--backend openvino`;
- bf16 is offered only where its record passed, refused with the reason elsewhere, and unknown
  combinations (onnxruntime bf16, OpenVINO on CUDA, OpenVINO not installed) fail in one line.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack

import numpy as np
import pytest

from conftest import EXAMPLE, LANG_NEW, LANG_PROMPT, LONG_PROMPT, family_model, run_cli
from serve_support import live_server

try:
    import openvino  # noqa: F401
except ImportError:  # the test extra installs it; CI (GSS_REQUIRE_EXAMPLES=1) fails instead of skipping
    if os.environ.get("GSS_REQUIRE_EXAMPLES") == "1":
        raise
    pytest.skip('OpenVINO is not installed (pip install "gss-runtime[openvino]")', allow_module_level=True)

from gss_runtime import Decoder, Generator, GSSRunner, RuntimeInputError  # noqa: E402
from gss_runtime.backends import openvino as ov_backend  # noqa: E402

# the server's exactness tests, collected again here against the servers below
from test_serve import folders, test_completions_equal_eager_greedy, test_concurrent_requests_equal_their_solo_runs  # noqa: E402,F401
from test_serve_scoring import (eager, test_echo_scores_the_prompt_as_eager_does,  # noqa: E402,F401
                                test_generated_logprobs_are_eagers_and_lm_eval_gets_one_entry_per_token,
                                test_streamed_and_whole_logprobs_agree_exactly)

FAMILIES = ("dsconv", "gss", "mhesa")


@pytest.fixture(scope="module")
def servers(folders):
    """family -> a live gss-serve on OpenVINO f32 (8 running, 16 waiting, one thread)."""
    with ExitStack() as stack:
        yield {f: stack.enter_context(live_server(folders[f], "--backend", "openvino", "--max-batch", "8", "--max-queue", "16",
                                                  "--threads", "1")) for f in FAMILIES}


@pytest.fixture(scope="module")
def checked(tmp_path_factory, ours):
    """family -> (folder, ExportResult) of an export made with --openvino's check (the library call)."""
    from gss_export.backend_check import OpenVinoRequest
    from gss_export.export import export_model
    from gss_export.tolerances import quality_for

    made = {}
    for family in FAMILIES:
        model = ours if family == "dsconv" else family_model(family)
        out = tmp_path_factory.mktemp(f"openvino_{family}")
        made[family] = out, export_model(model, "onnx", out, openvino=OpenVinoRequest(None, quality_for("bf16")))
    return made


@pytest.mark.parametrize("family", FAMILIES)
def test_export_validates_on_openvino_f32(checked, family):
    """Forward at the default shapes, decoder and prefill at the decoder cases: within 1e-4 relative on OpenVINO."""
    folder, result = checked[family]
    forward, decoder = result.openvino.forward, result.openvino.decoder
    assert forward.ok and decoder.ok, forward.failures + decoder.failures
    lengths = {row.length for row in forward.rows}
    config = json.loads((folder / "config.json").read_text())
    assert {1, 127, 128, 129, 1024, 1025} <= lengths and max(lengths) == config["model"]["max_seq_len"]
    assert {row.batch for row in forward.rows} == {1, 3}
    assert any("prefill" in row.case for row in decoder.rows) and any("step" in row.case for row in decoder.rows)
    print(f"\n{family} on OpenVINO f32: forward max rel {forward.worst[1]:.1e}, decoder max rel {decoder.worst[1]:.1e}")
    record = config["backends"]["openvino"]
    assert record["f32"]["ok"] and record["f32"]["max_rel"] == forward.worst[1]
    assert record["version"] == ov_backend.version()


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_is_measured_and_offered_only_where_it_passed(checked, family):
    folder, result = checked[family]
    record = json.loads((folder / "config.json").read_text())["backends"]["openvino"]["bf16"]
    if not ov_backend.has_bf16():
        assert not record["ok"] and "no bf16 arithmetic" in record["failures"][0]
    else:
        for name in ("model.onnx", "decoder.onnx"):
            q = record["quality"][name]
            assert 0 <= q["top1"] <= 1 and q["kl"] >= 0 and q["windows"] * q["window"] >= 1000
            passed = q["top1"] >= 0.95 and q["kl"] <= 0.02
            assert q["ok"] == passed
            print(f"\n{family} {name} bf16: top-1 {q['top1']:.4f}, KL {q['kl']:.2e}")
        assert record["ok"] == all(q["ok"] for q in record["quality"].values())
    if record["ok"]:
        decoder = Decoder(folder, backend="openvino", precision="bf16", threads=1)
        assert decoder.providers == ["OpenVINO CPU bf16"]
        assert len(Generator(folder, backend="openvino", precision="bf16").generate(LANG_PROMPT, 4).tokens[0]) == 4
    else:
        with pytest.raises(RuntimeInputError, match="bf16 .*(failed this export's quality check|no bf16 arithmetic)"):
            Decoder(folder, backend="openvino", precision="bf16")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_on_openvino_equals_eager(family, folders, lang_reference, long_reference, family_references):
    """Greedy tokens on OpenVINO f32 are upstream eager's: a short prompt (steps) and, for the example, a
    300-token one (prefill.onnx)."""
    generator = Generator(folders[family], backend="openvino", threads=1)
    assert generator.decoder.providers == ["OpenVINO CPU f32"]
    want = lang_reference if family == "dsconv" else family_references[family]
    assert generator.generate(LANG_PROMPT, LANG_NEW).tokens[0] == want
    if family == "dsconv":
        assert generator.generate(LONG_PROMPT, LANG_NEW).tokens[0] == long_reference


def test_runner_and_decoder_agree_across_backends(folders):
    """GSSRunner's logits and a ragged prefill + steps: OpenVINO f32 against onnxruntime, every family."""
    rng = np.random.default_rng(5)
    for family in FAMILIES:
        ids = rng.integers(0, 256, size=(2, 200))
        a, b = (GSSRunner(folders[family], backend=k, threads=1).logits(ids) for k in ("onnxruntime", "openvino"))
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
        decoders = [Decoder(folders[family], backend=k, threads=1) for k in ("onnxruntime", "openvino")]
        (la, sa), (lb, sb) = (d.prefill([ids[0, :150].tolist(), ids[1, :7].tolist()]) for d in decoders)
        for t in range(4):
            assert np.abs(la - lb).max() <= 1e-4 * np.abs(la).max()
            (la, sa), (lb, sb) = decoders[0].step(ids[:, 150 + t], sa), decoders[1].step(ids[:, 150 + t], sb)


def test_requests_no_backend_offers_fail_in_one_line(folders, monkeypatch):
    folder = folders["dsconv"]
    with pytest.raises(RuntimeInputError, match="onnxruntime runs these exports in f32"):
        Decoder(folder, precision="bf16")
    with pytest.raises(RuntimeInputError, match="runs on the CPU; provider cuda"):
        GSSRunner(folder, backend="openvino", provider="cuda")
    with pytest.raises(RuntimeInputError, match="unknown backend"):
        Generator(folder, backend="tensorrt")
    with pytest.raises(RuntimeInputError, match="has not been checked for this export.*gss-export CKPT --output DIR --openvino"):
        Decoder(folder, backend="openvino", precision="bf16")
    monkeypatch.setattr(ov_backend, "ov", None)
    with pytest.raises(RuntimeInputError, match=r'pip install "gss-runtime\[openvino\]"'):
        Decoder(folder, backend="openvino")


def test_the_command_lines_take_the_backend(tmp_path, monkeypatch, capsys, folders):
    """gss-export --openvino on the example; gss-run on OpenVINO; bf16 refused (exit 2) where the record says no."""
    from gss_runtime.cli import main as gss_run

    out = tmp_path / "byte_lm"
    code, stdout, stderr = run_cli(monkeypatch, capsys, EXAMPLE, "--output", out, "--openvino", "--lengths", "1,129,700")
    assert code == 0, stderr
    assert "on OpenVINO f32" in stdout and "on OpenVINO bf16" in stdout
    record = json.loads((out / "config.json").read_text())["backends"]["openvino"]
    assert record["f32"]["ok"]

    def run(*args):
        monkeypatch.setattr("sys.argv", ["gss-run", str(out), *args])
        try:
            gss_run()
        except SystemExit as e:
            return e.code, *capsys.readouterr()
        return 0, *capsys.readouterr()

    code, stdout, _ = run("--prompt-ids", ",".join(map(str, LANG_PROMPT)), "--max-new-tokens", "8", "--backend", "openvino", "--json")
    assert code == 0 and json.loads(stdout)["provider"] == "OpenVINO CPU f32"
    code, _, stderr = run("--prompt", "x", "--backend", "openvino", "--precision", "bf16")
    if record["bf16"]["ok"]:
        assert code == 0
    else:  # the example's measured bf16 (top-1 0.90 on this CPU kind) is below the bar: refused with why
        assert code == 2 and "bf16" in stderr and len(stderr.strip().splitlines()) <= 3
        assert "top-1" in stderr or "no bf16 arithmetic" in stderr
    code, _, stderr = run("--prompt", "x", "--precision", "bf16")
    assert code == 2 and "onnxruntime runs these exports in f32" in stderr


def test_the_decoder_state_is_written_in_place(folders, monkeypatch):
    """OpenVINO writes the new slots straight into the state's buffers: the copy that would follow a
    plugin that wrote elsewhere never happens, for a prefill and for steps."""
    copies = []
    real = ov_backend.np.copyto
    monkeypatch.setattr(ov_backend.np, "copyto", lambda *a, **k: (copies.append(a[0].shape), real(*a, **k)))
    decoder = Decoder(folders["dsconv"], backend="openvino", threads=1)
    _, state = decoder.prefill([LONG_PROMPT, LANG_PROMPT], room=4)
    for _ in range(4):
        _, state = decoder.step([1, 2], state)
    assert copies == [] and state.length == len(LONG_PROMPT) + 1 + 4
