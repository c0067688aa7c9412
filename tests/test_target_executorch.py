"""The ExecuTorch target (`--format executorch`): model.pte with forward, step and prefill, every family.

Each export is validated by gss-export itself through `executorch.runtime` (forward at the default shapes
within the batch bound, the decoder cases through step and prefill; 1e-4 relative), greedy generation
through the program equals upstream eager's tokens (a prompt through prefill included), and requests past
the bounds, or that cannot lower, fail with one clear message.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import FAMILY_SMALL, LANG_NEW, LANG_PROMPT, LONG_PROMPT, SMALL, eager_greedy, run_cli

try:
    import executorch  # noqa: F401
except ImportError:  # the test extra installs it; CI (GSS_REQUIRE_EXAMPLES=1) fails instead of skipping
    if os.environ.get("GSS_REQUIRE_EXAMPLES") == "1":
        raise
    pytest.skip('ExecuTorch is not installed (pip install "gss-export[executorch]")', allow_module_level=True)

from gss_export.errors import GSSExportError  # noqa: E402
from gss_export.export import export_model  # noqa: E402
from gss_export.families import FAMILIES  # noqa: E402
from gss_export.targets.executorch import PteProgram  # noqa: E402

MAX_LEN = 340  # past LONG_PROMPT (300) + 24 new tokens; past 128 and 129 for the prefill threshold
SIZES = {"dsconv": SMALL, **FAMILY_SMALL}


def models(family: str):
    """(ours with max_seq_len MAX_LEN, upstream) with the same seeded weights."""
    entry = FAMILIES[family]
    torch.manual_seed(21)
    upstream = entry.upstream(entry.config(**SIZES[family])).eval()
    ours = entry.model(entry.config(**SIZES[family], max_seq_len=MAX_LEN))
    ours.load_state_dict(upstream.state_dict(), strict=True)
    return ours.eval(), upstream


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """family -> (folder, ExportResult, upstream) of a validated export (batch bound 3, the default shapes' largest)."""
    made = {}
    for family in SIZES:
        ours, upstream = models(family)
        out = tmp_path_factory.mktemp(f"pte_{family}")
        made[family] = out, export_model(ours, "executorch", out, max_batch=3), upstream
    return made


@pytest.mark.parametrize("family", list(SIZES))
def test_the_program_validates_within_its_bounds(programs, family):
    folder, result, _ = programs[family]
    assert result.report.ok and result.decoder_report.ok, result.report.failures + result.decoder_report.failures
    rows = result.report.rows
    assert {r.batch for r in rows} == {1, 3} and {1, 127, 128, 129, MAX_LEN} <= {r.length for r in rows}
    assert any("prefill" in r.case for r in result.decoder_report.rows)
    print(f"\n{family}: forward max rel {result.report.worst[1]:.1e}, decoder max rel {result.decoder_report.worst[1]:.1e}")
    config = json.loads((folder / "config.json").read_text())
    lowering = config["export"]["lowering"]
    assert set(lowering) == {"forward", "step", "prefill"} and all(m["planned_bytes"] > 0 for m in lowering.values())
    assert config["export"]["conv"] == "fft2n_last" and config["export"]["max_batch"] == 3
    assert (folder / "model.pte").stat().st_size == config["export"]["bytes"]


@pytest.mark.parametrize("family", list(SIZES))
def test_greedy_generation_through_the_program_equals_eager(programs, family):
    folder, result, upstream = programs[family]
    program = PteProgram(folder / "model.pte", result_config(folder, family))
    assert (program.max_batch, program.max_seq_len) == (3, MAX_LEN)
    assert program.generate(LANG_PROMPT, LANG_NEW) == eager_greedy(upstream, LANG_PROMPT, LANG_NEW)
    # 300 tokens: through `prefill` for every family (its threshold is at most 128)
    assert program.generate(LONG_PROMPT, 8) == eager_greedy(upstream, LONG_PROMPT, 8)


def result_config(folder, family):
    entry = FAMILIES[family]
    return entry.config(**{k: v for k, v in json.loads((folder / "config.json").read_text())["model"].items() if k != "family"})


def test_requests_past_the_bounds_fail_clearly(programs, tmp_path, monkeypatch, capsys):
    folder, _, _ = programs["dsconv"]
    program = PteProgram(folder / "model.pte", result_config(folder, "dsconv"))
    with pytest.raises(GSSExportError, match="batch 4 is above this program's bound of 3"):
        program.forward(np.zeros((4, 5), np.int64))
    with pytest.raises(GSSExportError, match="above this program's max_seq_len 340"):
        program.forward(np.zeros((1, MAX_LEN + 1), np.int64))
    ours, _ = models("dsconv")
    for kwargs, message in ((dict(max_batch=1), "--max-batch must be from 2 to 64"),
                            (dict(conv="monarch"), "monarch form picks its block sizes")):
        with pytest.raises(GSSExportError, match=message):
            export_model(ours, "executorch", tmp_path / "bad", validate=False, **kwargs)
    with pytest.raises(GSSExportError, match="--max-batch bounds an ExecuTorch program"):
        export_model(ours, "onnx", tmp_path / "bad", validate=False, max_batch=2)
    assert not (tmp_path / "bad").exists()


def test_the_command_line_reports_memory_and_portable_ops(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from tiny import tiny_state_dict  # a tiny GatedDsConvLM: seconds to export

    ckpt = tmp_path / "tiny.safetensors"
    save_file(tiny_state_dict(), str(ckpt))
    code, stdout, stderr = run_cli(monkeypatch, capsys, ckpt, "--format", "executorch", "--output", tmp_path / "pte",
                                   "--max-seq-len", "64", "--max-batch", "3")
    assert code == 0, stderr
    assert "planned memory" in stdout and "forward" in stdout and "_fft_r2c" in stdout
    code, _, stderr = run_cli(monkeypatch, capsys, ckpt, "--format", "executorch", "--output", tmp_path / "bad", "--max-batch", "100")
    assert code == 2 and "--max-batch must be from 2 to 64" in stderr and not (tmp_path / "bad").exists()
