"""The benchmark's own logic: its targets table and the kernel split it reports (not its timings)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kernel_time import weight_product_nodes  # noqa: E402
from report import _targets  # noqa: E402


def _results(rows: list[tuple[int, float, float, float]]) -> dict:
    """(length, eager ms, default export ms, compute floor ms) per row."""
    return {"prefill": [{"length": n, "ms": {"upstream eager": e, "onnx auto (switch)": a}, "compute_floor_ms": f}
                        for n, e, a, f in rows]}


def test_targets_name_the_worst_length_and_say_whether_each_is_met():
    table = "\n".join(_targets(_results([(1, 3.0, 1.5, 0.1), (128, 18.0, 14.0, 11.0), (1024, 130.0, 100.0, 90.0),
                                         (2048, 250.0, 260.0, 180.0)])))
    assert "| >= 1.5x eager at lengths <= 128 | 1.29x at 128 | no |" in table
    assert "| never slower than eager | 0.96x at 2048 | no |" in table
    assert "| >= 85% of the matmul rate at lengths >= 1024 | 69% at 2048 | no |" in table
    table = "\n".join(_targets(_results([(64, 12.0, 7.0, 5.0), (1024, 130.0, 100.0, 90.0)])))
    assert "| >= 1.5x eager at lengths <= 128 | 1.71x at 64 | yes |" in table
    assert "| never slower than eager | 1.30x at 1024 | yes |" in table
    assert "| >= 85% of the matmul rate at lengths >= 1024 | 90% at 1024 | yes |" in table


def test_weight_products_are_found_inside_if_branches_and_only_there(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    branch = lambda name, nodes: helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("y_" + name, TensorProto.FLOAT, None)])
    then = branch("then", [helper.make_node("MatMul", ["x", "W"], ["y_then"], name="weight_in_branch")])
    other = branch("else", [helper.make_node("MatMul", ["x", "x"], ["y_else"], name="activation_product")])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["top"], name="weight_top"),
         helper.make_node("If", ["flag"], ["y"], name="switch", then_branch=then, else_branch=other)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_tensor_value_info("top", TensorProto.FLOAT, None)],
        initializer=[w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    assert weight_product_nodes(str(path)) == {"weight_top", "weight_in_branch"}


def test_int8_targets_read_the_default_setting_from_128_tokens():
    from int8 import SETTINGS, TARGETS, report

    def results(ms_128: float, top1_decoder: float, decode_int8: float) -> dict:
        prefill = [{"length": n, "ms": {"float32": 10.0, **{k: ms for k in SETTINGS}}}
                   for n, ms in ((64, 9.9), (128, ms_128), (512, 6.0))]
        quality = [{"setting": k, "top1": 0.97, "top1_decoder": top1_decoder, "kl": 0.01, "kl_decoder": 0.015} for k in SETTINGS]
        machine = {"cpu": "test CPU", "seen_as": "avx2", "cpu_features": ["AVX2"], "int8_target": "avx2", "threads": 2,
                   "onnxruntime": "x", "torch": "y"}
        return {"machine": machine, "targets": TARGETS, "prefill": prefill, "quality": quality,
                "decode": [{"context": 128, "ms_per_token": {"float32": 1.0, "int8": decode_int8}}]}

    table = report(results(7.0, 0.96, 0.9))
    assert "AVX-512, AVX-VNNI and AMX hidden" in table and "int8 target probed: avx2" in table
    assert "| >= 1.3x float32 prefill from 128 tokens | 1.43x | yes |" in table  # 64 tokens (1.01x) not counted
    assert "| top-1 >= 0.95 (model, decoder) | 0.9600 | yes |" in table
    assert "| mean KL <= 0.02 (model, decoder) | 0.0150 | yes |" in table
    assert "| decode no slower than float32 | 1.11x | yes |" in table
    table = report(results(8.0, 0.94, 1.1))
    assert "| >= 1.3x float32 prefill from 128 tokens | 1.25x | no |" in table
    assert "| top-1 >= 0.95 (model, decoder) | 0.9400 | no |" in table
    assert "| decode no slower than float32 | 0.91x | no |" in table


def test_upstream_peak_memory_runs_upstream_with_the_reference_settings():
    """The benchmarks' upstream memory row builds upstream's model from our config (no keys it lacks)."""
    from common import peak_memory

    from gss_export.families import DsConvConfig

    cfg = DsConvConfig(num_tokens=256, dim=16, depth=1, heads=2, dim_dsconv=8, max_seq_len=64)
    got = peak_memory("upstream", json.dumps(cfg.upstream_kwargs()), 16, 1)
    assert "error" not in got, got
    assert got["peak_mib"] >= got["baseline_mib"] > 0
