"""Every exported artifact against the upstream eager model at batch 1 and 3 and every test length."""
from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import BATCHES, LENGTHS, MAX_LEN, RTOL, max_errors
from gss_export.export import export_model
from gss_export.targets.torch_decoder import TorchDecoder
from gss_export.tolerances import Tolerance
from gss_export.targets.torchscript import load_torchscript
from gss_export.validation import torch_runner, validate_decoder

ONNX_CASES = [
    ("direct", 17), ("direct", 20), ("fft", 17), ("fft", 18), ("fft", 20),
    ("monarch", 17), ("monarch", 18), ("monarch", 20), ("monarch", 23), ("auto", 17), ("auto", 20),
]


def assert_parity(run, reference, label):
    rows = []
    for (b, n), (ids, want) in reference.items():
        got = run(ids)
        assert got.shape == want.shape, f"{label} b={b} n={n}: shape {got.shape} != {want.shape}"
        abs_err, rel_err = max_errors(got, want)
        rows.append((b, n, abs_err, rel_err))
        assert rel_err <= RTOL, f"{label} b={b} n={n}: max abs {abs_err:.3g}, rel {rel_err:.3g} > {RTOL}"
    # printed with -s; the closing note's table comes from here
    print(f"\n{label}: " + ", ".join(f"b{b} n{n} rel {r:.1e}" for b, n, _, r in rows))


@pytest.mark.parametrize("conv,opset", ONNX_CASES, ids=[f"{c}-opset{o}" for c, o in ONNX_CASES])
def test_onnx_matches_upstream(ours, reference, tmp_path, conv, opset):
    result = export_model(ours, "onnx", tmp_path, conv=conv, opset=opset, validate=False)
    path = tmp_path / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*model.graph.input, *model.graph.output)]
    assert dims == [["batch", "sequence"], ["batch", "sequence", 256]]
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["gss_export.model"] == ours.config.to_dict()
    assert meta["gss_export.export"]["conv"] == result.settings["conv"] != "auto"
    assert json.loads((tmp_path / "config.json").read_text())["export"]["opset"] == opset

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert_parity(lambda ids: session.run(["logits"], {"input_ids": ids})[0], reference, f"onnx {conv} opset {opset}")


@pytest.mark.parametrize("conv", ["direct", "fft", "monarch", "auto"])
def test_torchscript_matches_upstream(ours, reference, tmp_path, conv):
    export_model(ours, "torchscript", tmp_path, conv=conv, validate=False)
    scripted = load_torchscript(tmp_path / "model.pt")

    def run(ids):
        with torch.no_grad():
            return scripted(torch.from_numpy(ids)).numpy()

    assert_parity(run, reference, f"torchscript {conv}")


def test_onnx_auto_switches_form_by_length_inside_the_graph(ours, tmp_path):
    """auto = one If on the sequence length: the Toeplitz graph up to 128 tokens, monarch above, weights stored once."""
    export_model(ours, "onnx", tmp_path / "auto", validate=False, decoder=False)
    export_model(ours, "onnx", tmp_path / "monarch", conv="monarch", validate=False, decoder=False)
    model = onnx.load(str(tmp_path / "auto" / "model.onnx"))
    (switch,) = [n for n in model.graph.node if n.op_type == "If"]
    branches = {a.name: {n.op_type for n in a.g.node} for a in switch.attribute}
    assert "Cos" not in branches["then_branch"] and "Cos" in branches["else_branch"]  # direct, then monarch's tables
    condition = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}["length_switch/threshold"]
    assert int(condition) == 128
    sizes = [(tmp_path / d / "model.onnx").stat().st_size for d in ("auto", "monarch")]
    assert sizes[0] < 1.1 * sizes[1]


TORCH_EXPORT_CASES = [("pt2", "auto"), ("pt2", "direct"), ("aoti", "auto")]


@pytest.mark.parametrize("fmt,conv", TORCH_EXPORT_CASES, ids=[f"{f}-{c}" for f, c in TORCH_EXPORT_CASES])
def test_torch_export_targets_match_upstream(ours, reference, tmp_path, fmt, conv):
    """model.pt2 through the public loaders (torch.export.load, aoti_load_package): forward, step and prefill."""
    from torch._inductor import aoti_load_package
    from torch._inductor.package import load_package
    from torch.export.pt2_archive._package import load_pt2

    result = export_model(ours, fmt, tmp_path, conv=conv, validate=False)
    assert result.settings["conv"] == ("direct" if conv == "direct" else "fft2n")
    path = tmp_path / "model.pt2"
    if fmt == "pt2":
        programs = load_pt2(str(path)).exported_programs
        forward, step, prefill = torch.export.load(str(path)).module(), programs["step"].module(), programs["prefill"].module()
    else:
        forward, step, prefill = aoti_load_package(str(path)), load_package(str(path), "step"), load_package(str(path), "prefill")
    assert_parity(torch_runner(forward), reference, f"{fmt} {conv}")
    steps = validate_decoder(TorchDecoder(step, ours.config, prefill=prefill), f"{fmt} step", ours, Tolerance(rtol=RTOL))
    assert steps.ok and len(steps.rows) == 5, steps.failures


@pytest.mark.parametrize("conv", ["direct", "fft", "monarch"])
def test_eager_forms_match_upstream(ours, reference, conv):
    model = ours.with_conv(conv)
    assert model.token_emb.weight.data_ptr() == ours.token_emb.weight.data_ptr()  # weights reused, not copied

    def run(ids):
        with torch.no_grad():
            return model(torch.from_numpy(ids)).numpy()

    assert_parity(run, reference, f"eager {conv}")


def test_validation_passes_and_reports_every_shape(ours, tmp_path):
    result = export_model(ours, "onnx", tmp_path, conv="fft", shapes=[(1, 1), (3, 129), (2, 2048)])
    report = result.report
    assert report.ok and report.reference.startswith("gated-state-spaces-pytorch")
    assert [(r.batch, r.length) for r in report.rows] == [(1, 1), (3, 129), (2, 2048)]
    assert all(r.passed and r.max_rel <= RTOL for r in report.rows)
    saved = json.loads((tmp_path / "config.json").read_text())["validation"]
    assert saved["ok"] and len(saved["rows"]) == 3


def test_reverse_seq_layer_matches_upstream():
    from gated_state_spaces_pytorch import GatedDsConv as UpstreamLayer

    from gss_export.families.dsconv import GatedDsConv

    torch.manual_seed(0)
    theirs = UpstreamLayer(dim=32, heads=4, dim_dsconv=16, reverse_seq=True).eval()
    for conv in ("direct", "fft", "monarch"):
        mine = GatedDsConv(dim=32, heads=4, dim_dsconv=16, reverse_seq=True, conv=conv).eval()
        mine.load_state_dict(theirs.state_dict(), strict=True)
        for n in (1, 2, 65, 300):
            x = torch.randn(3, n, 32)
            with torch.no_grad():
                _, rel = max_errors(mine(x).numpy(), theirs(x).numpy())
            assert rel <= RTOL, (conv, n, rel)


def test_lengths_cover_every_block_boundary():
    from gss_export.conv.forms import next_pow2
    from gss_export.conv.monarch import monarch_sizes

    # the FFT form's length changes where 2n-1 crosses a power of two: check tests straddle one
    sizes = {n: next_pow2(2 * n - 1) for n in LENGTHS}
    assert sizes[128] != sizes[129] and len(set(sizes.values())) >= 5
    # the monarch form's block b: every change of b is straddled by two test lengths
    blocks = {n: monarch_sizes(n)[1] for n in range(1, MAX_LEN + 1)}
    changes = [n for n in range(2, MAX_LEN + 1) if blocks[n] != blocks[n - 1]]
    assert changes == [3, 17, 129, 1025]
    assert all(n - 1 in LENGTHS and n in LENGTHS for n in changes)
    assert BATCHES == (1, 3)
