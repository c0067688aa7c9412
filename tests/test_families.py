"""GatedStateSpacesLM and GatedExponentialSmoothingLM: equal to upstream eager, loaded from upstream
checkpoints, exported to every target, and decoded with a fixed-size state without torch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAMILY_MAX_LEN, FAMILY_SMALL, RTOL, eager_greedy, family_model, family_upstream, max_errors, run_without_torch
from gss_export.checkpoint import load_checkpoint
from gss_export.errors import CheckpointError
from gss_export.families import FAMILIES, GatedExponentialSmoothingLM, GatedStateSpacesLM

FAMILIES_NEW = ("gss", "mhesa")
# 1, 2, 7, 100, both sides of every block change of the convolution forms (monarch: 2/3, 16/17, 128/129,
# 1024/1025; the FFT's powers of two at 64/65, 128/129) and the maximum
LENGTHS = (1, 2, 3, 7, 16, 17, 64, 65, 100, 128, 129, 1024, 1025, FAMILY_MAX_LEN)
FORMS = ("direct", "fft", "monarch")


@pytest.mark.parametrize("family", FAMILIES_NEW)
@pytest.mark.parametrize("form", FORMS)
def test_eager_forms_equal_upstream(family, form):
    upstream = family_upstream(family)
    ours = family_model(family).with_conv(form)
    rng = np.random.default_rng(3)
    for b in (1, 3):
        for n in LENGTHS:
            ids = torch.from_numpy(rng.integers(0, 256, size=(b, n)))
            with torch.no_grad():
                _, rel = max_errors(ours(ids).numpy(), upstream(ids).numpy())
            assert rel <= RTOL, (b, n, rel)


@pytest.mark.parametrize("imag_exp", [True, False])
def test_gss_lambda_imag_exp_both_ways(imag_exp, tmp_path):
    from gated_state_spaces_pytorch import GatedStateSpacesLM as Upstream

    torch.manual_seed(5)
    upstream = Upstream(num_tokens=50, dim=32, depth=2, dss_kernel_N=16, dss_kernel_H=24, dss_kernel_lambda_imag_exp=imag_exp).eval()
    torch.save({"model": {f"net.{k}": v for k, v in upstream.state_dict().items()}}, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(tmp_path / "ckpt.pt", dss_kernel_lambda_imag_exp=imag_exp)
    assert loaded.family == "GatedStateSpacesLM" and loaded.config.dss_kernel_lambda_imag_exp is imag_exp
    assert (loaded.config.dss_kernel_H, loaded.config.dss_kernel_N, loaded.config.dim_expansion_factor) == (24, 16, 4)
    ids = torch.randint(0, 50, (2, 300))
    with torch.no_grad():
        assert max_errors(loaded.model(ids).numpy(), upstream(ids).numpy())[1] <= RTOL


def test_reverse_seq_layers_equal_upstream():
    from gated_state_spaces_pytorch.gss import GSS as UpGSS
    from gated_state_spaces_pytorch.mhesa import MHESA as UpMHESA
    from gss_export.families.dss import GSS
    from gss_export.families.mhesa import MHESA

    torch.manual_seed(6)
    x = torch.randn(2, 40, 32)
    for ours, theirs in ((GSS(dim=32, dss_kernel_N=8, dss_kernel_H=16, reverse_seq=True), UpGSS(dim=32, dss_kernel_N=8, dss_kernel_H=16, reverse_seq=True)),
                         (MHESA(dim=32, heads=4, reverse_seq=True), UpMHESA(dim=32, heads=4, reverse_seq=True))):
        ours.load_state_dict(theirs.state_dict(), strict=True)
        with torch.no_grad():
            assert max_errors(ours(x).numpy(), theirs(x).numpy())[1] <= RTOL
        with pytest.raises(ValueError, match="reverse_seq"):
            ours.step(x, torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)) if isinstance(ours, MHESA) else ours.step(x, None, None)


@pytest.mark.parametrize("family", FAMILIES_NEW)
def test_intake_tells_the_family_and_reads_its_config(family, tmp_path):
    upstream = family_upstream(family)
    torch.save(upstream.state_dict(), tmp_path / "ckpt.pt")
    loaded = load_checkpoint(tmp_path / "ckpt.pt", max_seq_len=512)
    assert loaded.family == FAMILIES[family].upstream_class
    assert loaded.config == FAMILIES[family].config(**FAMILY_SMALL[family], max_seq_len=512)
    assert isinstance(loaded.model, {"gss": GatedStateSpacesLM, "mhesa": GatedExponentialSmoothingLM}[family])


def test_intake_names_the_family_on_a_mismatch(tmp_path):
    sd = family_upstream("gss").state_dict()
    del sd["layers.1.dss.C_imag"]
    sd["layers.1.dss.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt")
    message = str(info.value)
    assert "GatedStateSpacesLM" in message and "layers.1.dss.C_imag" in message and "layers.1.dss.extra" in message
    mhesa = family_upstream("mhesa").state_dict()
    torch.save(mhesa, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="GatedStateSpacesLM only"):
        load_checkpoint(tmp_path / "m.pt", dss_kernel_lambda_imag_exp=False)
    mixed = {**mhesa, **{k: v for k, v in sd.items() if ".dss." in k}}
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="several families"):
        load_checkpoint(tmp_path / "mixed.pt")


def _check(result):
    for report in (result.report, result.decoder_report):
        assert report is not None and report.ok, report.failures if report else "no report"
        assert report.worst[1] <= RTOL
    shapes = {(r.batch, r.length) for r in result.report.rows}
    assert {(b, n) for b in (1, 3) for n in LENGTHS} <= shapes


@pytest.mark.parametrize("family", FAMILIES_NEW)
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2", "aoti"])
def test_every_target_validates_against_upstream(family, fmt, family_exports):
    out = family_exports(family, fmt)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["family"] == family
    for key in ("validation", "decoder_validation"):
        report = config[key]
        assert report["ok"] and "upstream" in report["reference"]
        assert max(r["max_rel"] for r in report["rows"]) <= RTOL
    rows = {(r["batch"], r["length"]) for r in config["validation"]["rows"]}
    assert {(b, n) for b in (1, 3) for n in LENGTHS} <= rows
    if fmt == "onnx":
        decoder = config["export"]["decoder"]
        assert decoder["state"] == "replace" and decoder["state_bytes"] > 0
        assert [i["name"] for i in decoder["inputs"]] == ["input_ids", "pad", "state.0", "state.1"]


@pytest.mark.parametrize("family", FAMILIES_NEW)
@pytest.mark.parametrize("conv", ["direct", "fft", "monarch"])
def test_every_onnx_form_validates(family, conv, tmp_path):
    from gss_export.export import export_model

    _check(export_model(family_model(family), "onnx", tmp_path, conv=conv))


@pytest.mark.parametrize("family", FAMILIES_NEW)
@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_reduced_precision_variants(family, variant, tmp_path):
    from gss_export.export import export_model
    from gss_export.tolerances import quality_for
    from gss_export.variants.request import VariantRequest

    result = export_model(family_model(family), "onnx", tmp_path, variant=VariantRequest(variant, quality_for(variant), None, 256, "auto"))
    assert result.report.ok and result.decoder_report.ok, (result.report.failures, result.decoder_report.failures)


TORCH_FREE = '''
import json, sys
import numpy as np
from gss_runtime import Generator, Sampling
gen = Generator(sys.argv[1] if len(sys.argv) > 1 else {out!r}, provider="cpu")
prompts = {prompts!r}
out = {{"alone": {{}}, "sampled": [], "state_bytes": []}}
for key, p in prompts.items():
    out["alone"][key] = gen.generate(p, {new}).tokens[0]
ragged = gen.generate(list(prompts.values()), {new})
out["ragged"] = ragged.tokens
for _ in range(2):
    out["sampled"].append(gen.generate(prompts["17"], {new}, sampling=Sampling(temperature=0.9, top_p=0.9), seed=7).tokens[0])
out["sampled_batch"] = gen.generate([prompts["1"], prompts["17"]], {new}, sampling=Sampling(temperature=0.9, top_p=0.9), seed=7).tokens[1]
# the state does not grow: its bytes after a 1-token and a 300-token prompt plus {new} steps
for key in ("1", "300"):
    out["state_bytes"].append(gen.generate(prompts[key], {new}).state_bytes)
print(json.dumps(out))
'''


@pytest.mark.parametrize("family", FAMILIES_NEW)
def test_torch_free_generation_equals_eager(family, family_exports):
    out = family_exports(family, "onnx")
    rng = np.random.default_rng(9)
    prompts = {str(n): rng.integers(0, 256, n).tolist() for n in (1, 17, 300)}
    new = 24
    done = run_without_torch(TORCH_FREE.format(out=str(out), prompts=prompts, new=new), timeout=600)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout.strip().splitlines()[-1])
    upstream = family_upstream(family)
    for key, prompt in prompts.items():
        assert res["alone"][key] == eager_greedy(upstream, prompt, new), key
    assert res["ragged"] == [res["alone"][k] for k in prompts]  # a ragged batch equals its solo runs
    assert res["sampled"][0] == res["sampled"][1] == res["sampled_batch"]  # seeded: reproducible, alone or batched
    assert res["state_bytes"][0] == res["state_bytes"][1] > 0


@pytest.mark.parametrize("family", FAMILIES_NEW)
def test_gss_run_generates_past_max_seq_len(family, family_exports):
    """gss-run drives every family; a recurrent state has no context limit, only each call's length does."""
    import subprocess
    import sys

    out = family_exports(family, "onnx")
    prompt = np.random.default_rng(4).integers(0, 256, FAMILY_MAX_LEN + 50).tolist()  # longer than one call may be
    cmd = [sys.executable, "-m", "gss_runtime.cli", str(out), "--prompt-ids", ",".join(map(str, prompt)),
           "--max-new-tokens", "30", "--json", "--provider", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert res["family"] == family and res["stop_reason"] == "max_new_tokens"
    assert res["tokens"] == eager_greedy(family_upstream(family), prompt, 30)


def test_gss_decoder_takes_one_token_and_longer_feeds_match(family_exports):
    """GatedStateSpacesLM's decoder.onnx is its one-token step: input_ids (batch, 1), said in config.json; a
    feed of several tokens through it (one call each, ragged padding included) equals prefill.onnx's and the
    eager model's logits, and its state equals prefill's."""
    import onnx

    from gss_runtime.decoder import Decoder

    out = family_exports("gss", "onnx")
    dims = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1]
    io = json.loads((out / "config.json").read_text())["export"]["decoder"]
    assert io["step_new_tokens"] == 1 and io["prefill_above"] == 1
    decoder = Decoder(out, provider="cpu")
    assert decoder.one_token
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, (3, 20))
    pad = np.array([0, 7, 19])
    stepped, state_a = decoder.feed(ids, decoder.empty_state(pad), whole=False)
    whole, state_b = decoder.feed(ids, decoder.empty_state(pad), whole=True)
    upstream = family_upstream("gss")
    for r in range(3):
        with torch.no_grad():
            want = upstream(torch.from_numpy(ids[r : r + 1, pad[r] :]))[0].numpy()
        assert max_errors(stepped[r, pad[r] :], want)[1] < RTOL
        assert max_errors(whole[r, pad[r] :], want)[1] < RTOL
    for a, b in zip(state_a.arrays, state_b.arrays):
        assert max_errors(a, b)[1] < RTOL


def test_gss_one_token_step_reads_and_writes_its_state_without_a_copy(family_exports):
    """The state is stored in blocks of g modes, (batch, N/g, H, 2, g), so decoder.onnx's one-token step
    turns it with one matrix product and writes the sum that adds u as the new state: each state.i feeds
    only a Reshape into a MatMul, and each new_state.i comes straight out of an Add (no Split, Concat,
    Transpose or Reshape copying a state-sized tensor on the way in or out)."""
    import onnx

    out = family_exports("gss", "onnx")
    config = json.loads((out / "config.json").read_text())
    N, H = config["model"]["dss_kernel_N"], config["model"]["dss_kernel_H"]
    g = 8 if N % 8 == 0 else 4 if N % 4 == 0 else 2 if N % 2 == 0 else 1
    shapes = [t["shape"] for t in config["export"]["decoder"]["inputs"][2:]]
    assert shapes == [["batch", N // g, H, 2, g]] * config["model"]["depth"]
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    consumers: dict[str, list] = {}
    producer = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    for i in range(config["model"]["depth"]):
        (reshape,) = consumers[f"state.{i}"]
        assert reshape.op_type == "Reshape"
        assert [n.op_type for n in consumers[reshape.output[0]]] == ["MatMul"]
        assert producer[f"new_state.{i}"].op_type == "Add"
