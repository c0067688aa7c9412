"""fp16 and int8 ONNX exports of the example checkpoint: quality on held-out text against float32
eager, file size against float32, generation with the runtime, and refusals of bad requests."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from conftest import EXAMPLE, LANG_NEW, LANG_PROMPT, run_cli
from gss_export.corpus import load_corpus
from gss_export.errors import GSSExportError
from gss_export.variants.quality import heldout

# the quality bars: top-1 agreement with float32 eager on held-out text, size against float32
BARS = {"fp16": (0.99, 0.6), "int8": (0.95, 0.4)}
FILES = ("model.onnx", "decoder.onnx")


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict:
    """{"fp16": folder, "int8": folder}: the example exported and validated (quality check) as each variant."""
    from gss_export.checkpoint import load_checkpoint
    from gss_export.export import export_model
    from gss_export.variants.request import VariantRequest

    model = load_checkpoint(EXAMPLE).model
    folders = {}
    for kind in BARS:
        folders[kind] = tmp_path_factory.mktemp(f"byte_lm_{kind}")
        export_model(model, "onnx", folders[kind], variant=VariantRequest(kind))
    return folders


@pytest.mark.parametrize("kind", BARS)
def test_quality_and_size_meet_the_bars(variants, example_onnx, kind):
    min_top1, max_ratio = BARS[kind]
    config = json.loads((variants[kind] / "config.json").read_text())
    for key in ("validation", "decoder_validation"):
        report = config[key]
        assert report["ok"] and report["kind"] == "quality", report
        assert report["top1"] >= min_top1 and report["windows"] * report["window"] >= 2048, report
    for name in FILES:  # against a float32 export written on its own, not the export's own record
        ratio = (variants[kind] / name).stat().st_size / (example_onnx / name).stat().st_size
        assert ratio <= max_ratio, (name, ratio)
        assert abs(ratio - config["export"]["variant"]["files"][name]["size_ratio"]) < 0.01


@pytest.mark.parametrize("kind", BARS)
def test_top1_recomputed_against_upstream_eager(variants, example_upstream, kind):
    """The library's own numbers, checked independently: windows the check did not use, plain argmax."""
    data = np.frombuffer(load_corpus()[1], np.uint8).astype(np.int64)
    session = ort.InferenceSession(str(variants[kind] / "model.onnx"), providers=["CPUExecutionProvider"])
    agree = []
    for start in (300, 9000, 17000):
        ids = data[start : start + 512][None]
        with torch.no_grad():
            want = example_upstream(torch.from_numpy(ids)).numpy()
        got = session.run(["logits"], {"input_ids": ids})[0]
        assert got.dtype == np.float32 and got.shape == want.shape
        agree.append(got.argmax(-1) == want.argmax(-1))
    assert np.mean(agree) >= BARS[kind][0]


def test_fp16_stores_weights_in_fp16_and_says_what_stayed_fp32(variants):
    config = json.loads((variants["fp16"] / "config.json").read_text())["export"]
    assert config["dtype"] == "float16"
    for name in FILES:
        model = onnx.load(str(variants["fp16"] / name))
        matrices = [i for i in model.graph.initializer if len(i.dims) == 2]
        assert matrices and all(i.data_type == TensorProto.FLOAT16 for i in matrices)
        record = config["variant"]["files"][name]
        assert record["fp16_ops"].get("Gather") == 1  # the embedding: onnxruntime's CPU provider has an fp16 Gather
        kept = record["fp32_ops"]
        assert set(kept) == {"no_fp16_kernel", "sequence_mixing"} and kept["sequence_mixing"].get("MatMul", 0) > 0
        session = ort.InferenceSession(str(variants["fp16"] / name), providers=["CPUExecutionProvider"])
        types = {v.name: v.type for v in session.get_inputs() + session.get_outputs()}
        assert types["input_ids"] == "tensor(int64)" and types["logits"] == "tensor(float)"
        assert all(t == "tensor(float)" for n, t in types.items() if n.startswith(("past_", "new_")))
    # the convolution's DFT tables stay float32: every Cos is fed by the float32 angle product, not a cast to fp16
    model = onnx.load(str(variants["fp16"] / "model.onnx"))
    made = {o: n for n in model.graph.node for o in n.output}
    cos = [n for n in model.graph.node if n.op_type == "Cos"]
    assert len(cos) == config["variant"]["files"]["model.onnx"]["fp32_ops"]["sequence_mixing"]["Cos"] == 9  # 3 per layer
    assert {made[n.input[0]].op_type for n in cos} == {"Mul"}


def test_int8_quantizes_every_weight_product(variants):
    config = json.loads((variants["int8"] / "config.json").read_text())["export"]["variant"]
    assert config["cpu"]["target"] in ("vnni", "avx2") and config["cpu"]["chosen_by"] == "probed on the exporting machine"
    for name in FILES:
        model = onnx.load(str(variants["int8"] / name))
        ops = {n.op_type for n in model.graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "MatMulIntegerToFloat"} <= ops
        floats = {i.name: list(i.dims) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2}
        # float32 weight matrices left: only the narrow ones (dim x heads: the convolution kernel's projection)
        assert floats and all(dims[-1] < 16 for dims in floats.values()), floats
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["gss_export.variant"])["variant"] == "int8" and "gss_export.model" in meta
        record = config["files"][name]
        assert record["cpu"] == config["cpu"]  # every file ranged for the same CPU
        precisions = {p["precision"] for p in record["products"]}
        assert precisions == {"int8, per-tensor activations", "int8, per-row activations", "float32"}
        assert all(p["why"] in record["why"] for p in record["products"])
        assert sum(p["precision"] == "float32" for p in record["products"]) == len(floats) == 3  # one per layer


@pytest.mark.parametrize("kind", BARS)
def test_decoder_variants_generate(variants, lang_reference, kind):
    from gss_runtime import Decoder, Generator

    made = Generator(variants[kind], provider="cpu").generate(LANG_PROMPT, LANG_NEW).tokens[0]
    # teacher-forced along eager's greedy continuation: does the variant pick eager's next token?
    decoder = Decoder(variants[kind], provider="cpu")
    logits, state = decoder.prefill([LANG_PROMPT])
    picks = [int(logits[0].argmax())]
    for token in lang_reference[:-1]:
        logits, state = decoder.step([token], state)
        picks.append(int(logits[0].argmax()))
    agree = np.mean(np.array(picks) == np.array(lang_reference))
    if kind == "fp16":
        assert made == lang_reference and agree == 1.0
    else:
        assert made[:4] == lang_reference[:4] and agree >= 0.9, (made, lang_reference, agree)


@pytest.mark.parametrize("kind", BARS)
def test_gss_run_runs_the_variant_folders(variants, kind):
    proc = subprocess.run(["gss-run", variants[kind], "--prompt", "The for statement", "--max-new-tokens", "50", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["tokens"]) == 50 and result["text"].startswith(" ")  # "The for statement is ..."


@pytest.mark.parametrize("args,words", [
    (["--quantize", "int8", "--min-top1", "0.999"], "top-1 agreement"),
    (["--dtype", "fp16", "--max-kl", "1e-9"], "mean KL divergence"),
])
def test_failed_threshold_leaves_earlier_export_untouched(monkeypatch, capsys, variants, tmp_path, args, words):
    out = tmp_path / "model"
    shutil.copytree(variants["int8"], out)
    before = snapshot(out)
    code, stdout, err = run_cli(monkeypatch, capsys, EXAMPLE, "-o", out, "--no-decoder", *args)
    assert code == 1 and words in err and "nothing was written" in err and "FAIL" in stdout
    assert "Traceback" not in stdout + err and len(err.strip().splitlines()) <= 12
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name != "model"] == []  # no staging folder left behind


@pytest.mark.parametrize("args,words", [
    (["--dtype", "fp16", "--quantize", "int8"], "not both"),
    (["--dtype", "fp16", "--format", "torchscript"], "use --format onnx"),
    (["--quantize", "int4"], "--quantize"),
    (["--dtype", "bf16"], "--dtype"),
    (["--min-top1", "0.9"], "applies to --dtype fp16 or --quantize int8"),
    (["--quantize", "int8", "--rtol", "1e-3"], "not by --rtol/--atol"),
    (["--quantize", "int8", "--min-top1", "1.5"], "--min-top1"),
    (["--quantize", "int8", "--heldout-text", "/no/such/file.txt"], "cannot read the held-out text"),
])
def test_bad_variant_options(monkeypatch, capsys, tmp_path, args, words):
    code, stdout, err = run_cli(monkeypatch, capsys, EXAMPLE, "-o", tmp_path / "out", *args)
    assert code == 2 and words in stdout + err, stdout + err
    assert "Traceback" not in stdout + err and not (tmp_path / "out").exists()


def test_heldout_text_for_other_vocabularies(tmp_path):
    with pytest.raises(GSSExportError, match="--heldout-text"):
        heldout(1000)  # the built-in text is bytes: a 1000-token model needs token ids from the user
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, range(0, 990, 10))) + "\n1,2, 3\n")
    assert heldout(1000, ids).ids.tolist() == list(range(0, 990, 10)) + [1, 2, 3]
    ids.write_text("12 7 the 4")
    with pytest.raises(GSSExportError, match="'the' is not a token id"):
        heldout(1000, ids)
    ids.write_text(" ".join(["5"] * 20 + ["1000"]))
    with pytest.raises(GSSExportError, match="out of range"):
        heldout(1000, ids)
    text = tmp_path / "text.txt"
    text.write_text("héllo " * 5)
    assert heldout(256, text).ids.tolist() == list("héllo ".encode() * 5)  # byte models read UTF-8 bytes
    text.write_text("tiny")
    with pytest.raises(GSSExportError, match="at least 16"):
        heldout(256, text)
