"""Int8 products with per-row activation scales, and the weight range chosen for the CPU's int8 kernels.

An AVX2-only CPU is had here by hiding AVX-512, AVX-VNNI and AMX from CPUID (benchmarks/avx2_only.c,
preloaded into a subprocess): onnxruntime then runs the kernels it runs on such a CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLE
from gss_export.variants.int8_products import resolve_target, rewrite_per_row
from gss_runtime.int8_cpu import PROBE, u8s8_saturates

ROOT = Path(__file__).resolve().parents[1]
FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()


@pytest.fixture(scope="module")
def avx2_only(tmp_path_factory) -> dict:
    """The environment of a subprocess that sees an AVX2-only CPU."""
    if shutil.which("cc") is None or "cpuid_fault" not in FLAGS:
        pytest.skip("hiding AVX-512 needs a C compiler and CPUID faulting (cpuid_fault)")
    shim = tmp_path_factory.mktemp("shim") / "avx2_only.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(ROOT / "benchmarks" / "avx2_only.c")], check=True)
    return {**os.environ, "LD_PRELOAD": str(shim)}


def in_subprocess(code: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def two_products(k: int = 64) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (..., k) -> x @ w1, x @ w2: two products of one input (its quantization is shared)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((k, 32)).astype(np.float32), rng.standard_normal((k, 48)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="p1"), helper.make_node("MatMul", ["x", "w2"], ["y2"], name="p2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None), helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), w1, w2


@pytest.mark.parametrize("reduce_range", [False, True])
def test_per_row_products_match_float(reduce_range):
    model, w1, w2 = two_products()
    rewrite_per_row(model, {"p1", "p2"}, reduce_range)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert len(weights) == 2 and max(int(np.abs(w).max()) for w in weights) == (64 if reduce_range else 127)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape in ((2, 7, 64), (5, 64), (1, 1, 64)):
        x = rng.standard_normal(shape).astype(np.float32)
        rows = x.reshape(-1, 64)
        rows[0] *= 30  # an outlier row: the others keep their own scale
        if len(rows) > 1:
            rows[-1] = 0  # a row of zeros
        for got, w in zip(session.run(None, {"x": x}), (w1, w2)):
            want = x @ w
            assert got.shape == want.shape and got.dtype == np.float32
            rows_got, rows_want = got.reshape(-1, w.shape[1]), want.reshape(-1, w.shape[1])
            live = slice(None) if len(rows) == 1 else slice(0, -1)
            if len(rows) > 1:
                assert np.all(rows_got[-1] == 0)
            # each row within int8 error of its own size, outlier or not
            err = np.abs(rows_got - rows_want).max(-1) / np.abs(rows_want).max(-1).clip(1e-30)
            assert err[live].max() < (0.05 if reduce_range else 0.03), err


def test_probe_matches_the_cpu(avx2_only):
    """Natively the probe says what the CPU flags say; with AVX-512 hidden it sees an AVX2-only CPU."""
    vnni = bool(FLAGS & {"avx512_vnni", "avx_vnni"})
    assert u8s8_saturates() is (not vnni)
    assert resolve_target()["target"] == ("vnni" if vnni else "avx2")
    seen = json.loads(in_subprocess("import json; from gss_export.variants.int8_products import resolve_target; print(json.dumps(resolve_target()))", avx2_only))
    assert seen["target"] == "avx2" and "AVX512F" not in seen["exporting_cpu_features"] and "AVX2" in seen["exporting_cpu_features"]
    assert resolve_target("vnni")["chosen_by"] == "--int8-cpu"


def test_the_probe_file_is_the_product_it_claims():
    """The runtime's probe (an ONNX file, since the runtime has no onnx package) against its description."""
    probe = onnx.load(str(PROBE))
    onnx.checker.check_model(probe)
    (node,) = probe.graph.node
    (b,) = probe.graph.initializer
    assert node.op_type == "MatMulInteger" and list(node.input) == ["a", "b"]
    assert np.array_equal(numpy_helper.to_array(b), np.full((64, 8), 127, np.int8))
    assert probe.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8


RUN_WINDOW = """
import numpy as np, onnxruntime as ort
from gss_export.corpus import load_corpus
ids = np.frombuffer(load_corpus()[1], np.uint8).astype(np.int64)[1000:1512][None]
s = ort.InferenceSession({path!r}, providers=["CPUExecutionProvider"])
np.save({out!r}, s.run(["logits"], {{"input_ids": ids}})[0])
"""


RUN_RUNTIME = """
import numpy as np
from gss_runtime import GSSRunner
from gss_export.corpus import load_corpus
ids = np.frombuffer(load_corpus()[1], np.uint8).astype(np.int64)[1000:1512][None]
np.save({out!r}, GSSRunner({path!r}, provider="cpu").logits(ids))
"""


def test_avx2_ranged_export_is_the_same_on_both_kernels(avx2_only, tmp_path):
    """--int8-cpu avx2: every int8 weight in [-64, 64], so AVX2's u8s8 kernel (int16 pair sums) cannot
    overflow: logits on the AVX2 kernels equal those on this CPU's. Full-range weights overflow in a
    plain session, and not in gss_runtime's, which turns on onnxruntime's exact products there."""
    from gss_export.checkpoint import load_checkpoint
    from gss_export.export import export_model
    from gss_export.variants.request import VariantRequest

    model = load_checkpoint(EXAMPLE).model
    diffs = {}
    for cpu in ("avx2", "vnni"):
        out = tmp_path / cpu
        export_model(model, "onnx", out, decoder=False, variant=VariantRequest("int8", int8_cpu=cpu))  # quality checked here
        config = json.loads((out / "config.json").read_text())
        assert config["export"]["variant"]["cpu"]["target"] == cpu and config["validation"]["ok"]
        proto = onnx.load(str(out / "model.onnx"))
        widest = max(int(np.abs(numpy_helper.to_array(i).astype(np.int32)).max()) for i in proto.graph.initializer
                     if i.data_type == TensorProto.INT8 and len(i.dims) == 2)
        assert widest == (64 if cpu == "avx2" else 127)
        logits = {}
        for where, env, code in (("native", None, RUN_WINDOW), ("avx2", avx2_only, RUN_WINDOW), ("avx2 runtime", avx2_only, RUN_RUNTIME)):
            path = tmp_path / f"{cpu}_{where.replace(' ', '_')}.npy"
            in_subprocess(code.format(path=str(out / "model.onnx"), out=str(path)), env)
            logits[where] = np.load(path)
        for where in ("avx2", "avx2 runtime"):
            diffs[cpu, where] = np.abs(logits["native"] - logits[where]).max() / np.abs(logits["native"]).max()
    assert diffs["avx2", "avx2"] < 1e-5 and diffs["avx2", "avx2 runtime"] < 1e-5, diffs
    # gss_runtime turns on onnxruntime's exact u8u8 products where u8s8 saturates: full-range weights exact too
    assert diffs["vnni", "avx2 runtime"] < 1e-5, diffs
    if FLAGS & {"avx512_vnni", "avx_vnni"}:  # natively exact, so a plain session's difference is AVX2's overflow
        assert diffs["vnni", "avx2"] > 1e-3, diffs
