"""Int8 weight products with one activation scale per row, and the CPU check that sets the weight range.

A product `Y = A @ W` by a weight matrix whose input has outlier positions (sums: the
convolution's output, the gated product) cannot share one activation scale across positions;
onnxruntime's dynamic quantizer only offers that (DynamicQuantizeLinear, one scale per tensor).
Here each row of A gets its own symmetric scale and the integer product runs on onnxruntime's
`MatMulIntegerToFloat` (MLAS's u8s8 kernels, the ones DynamicQuantizeMatMul uses):

    A2 = A as (rows, K);  s = max|A2| per row / 127                                  (rows, 1)
    Aq = QuantizeLinear(A2, s, 128)    uint8, zero point 128 (symmetric; the kernels take u8 x s8)
    Y  = MatMulIntegerToFloat(Aq, Wq, 1, w_scale, 128) * s          (rows, N), back to A's shape

`Wq` is int8 with one scale per output column (onnxruntime's `quantize_data`, symmetric).

Why the weight range depends on the CPU: without VNNI (AVX2, e.g. AMD Zen 3), MLAS multiplies
u8 x s8 pairs with `vpmaddubsw`, whose int16 sums saturate above 32767 (255 * 127 * 2 = 64770).
onnxruntime's remedy is `reduce_range`: weights in [-64, 64], so no pair can overflow (255 * 64
* 2 = 32640). With VNNI (`vpdpbusd`, AVX-512 VNNI or AVX-VNNI) the sums are int32 and the full
range is exact. `gss_runtime.int8_cpu.u8s8_saturates` asks onnxruntime itself, on this machine,
which kernel it has (the runtime uses the same answer to keep VNNI-ranged exports exact on AVX2).
"""
from __future__ import annotations

import numpy as np
from gss_runtime.int8_cpu import u8s8_saturates
from onnx import TensorProto, helper, numpy_helper

from ..errors import GSSExportError

CPU_TARGETS = ("auto", "vnni", "avx2")
WHY_TARGET = {
    "vnni": "onnxruntime's u8s8 product is exact here (VNNI: int32 sums): weights use the full int8 range",
    "avx2": "onnxruntime's u8s8 product saturates int16 pair sums here (no VNNI: AVX2, or AVX-512 without it): "
            "weights in [-64, 64] (onnxruntime's reduce_range), so no pair can overflow",
}
ZERO = 128  # the uint8 zero point of symmetric activations
TINY = np.float32(1e-30)  # a row of zeros gets max|A| = this instead of 0 (its products are 0 either way)


def cpu_features() -> list[str]:
    """The instruction sets that decide onnxruntime's int8 kernels, as this process sees them (CPUID)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return []
    return [name for name in ("AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX512_SPR") if features.get(name)]


def resolve_target(target: str = "auto") -> dict:
    """{"target": "vnni" | "avx2", "chosen_by", "why", "exporting_cpu_features"} for `target` (one of CPU_TARGETS)."""
    if target not in CPU_TARGETS:
        raise GSSExportError(f"--int8-cpu must be one of {', '.join(CPU_TARGETS)}, got {target!r}")
    features = cpu_features()
    if target == "auto":
        target = "avx2" if u8s8_saturates() else "vnni"
        chosen = "probed on the exporting machine"
    else:
        chosen = "--int8-cpu"
    return {"target": target, "chosen_by": chosen, "why": WHY_TARGET[target], "exporting_cpu_features": features}


def quantize_columns(weight: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights (K, N), float32 scales (N,)): symmetric, one scale per output column."""
    from onnxruntime.quantization.quant_utils import quantize_data

    q = np.empty(weight.shape, np.int8)
    scales = np.empty(weight.shape[1], np.float32)
    for j in range(weight.shape[1]):
        _, scale, q[:, j] = quantize_data(weight[:, j], TensorProto.INT8, True, reduce_range=reduce_range)
        scales[j] = scale
    return q, scales


def per_row_product(node, weight: np.ndarray, reduce_range: bool, opset: int, shared: dict) -> tuple[list, list]:
    """(nodes, initializers) computing MatMul `node` (input A (..., K), weight (K, N)) in int8 with per-row scales.

    `shared` maps an activation's name to its quantized form, so products of one input quantize it once.
    """
    a, y, p = node.input[0], node.output[0], node.name or node.output[0]
    k, n = weight.shape
    wq, w_scale = quantize_columns(weight, reduce_range)
    inits = [numpy_helper.from_array(wq, f"{p}/wq"), numpy_helper.from_array(w_scale, f"{p}/w_scale")]
    nodes = []
    if a not in shared:
        q = f"{a}/per_row"
        consts = {"rows_k": np.array([-1, k], np.int64), "minus_one": np.array([-1], np.int64), "axis": np.array([1], np.int64),
                  "inv127": np.float32(1 / 127), "tiny": TINY, "zero": np.uint8(ZERO), "start": np.array([0], np.int64),
                  "one": np.float32(1)}
        inits += [numpy_helper.from_array(np.asarray(v), f"{q}/{name}") for name, v in consts.items()]
        c = lambda name: f"{q}/{name}"  # noqa: E731

        def reduce(op, out):  # axes became an input in opset 18
            if opset >= 18:
                return helper.make_node(op, [c("rows"), c("axis")], [out], keepdims=1)
            return helper.make_node(op, [c("rows")], [out], axes=[1], keepdims=1)

        nodes += [
            helper.make_node("Shape", [a], [c("shape")]),
            helper.make_node("Slice", [c("shape"), c("start"), c("minus_one")], [c("lead")]),  # all but K
            helper.make_node("Reshape", [a, c("rows_k")], [c("rows")]),
            reduce("ReduceMax", c("max")),  # max and -min: two reads of A and no Abs written
            reduce("ReduceMin", c("min")),
            helper.make_node("Neg", [c("min")], [c("neg_min")]),
            helper.make_node("Max", [c("max"), c("neg_min"), c("tiny")], [c("absmax")]),
            helper.make_node("Mul", [c("absmax"), c("inv127")], [c("scale")]),  # (rows, 1)
            helper.make_node("Reshape", [c("scale"), c("minus_one")], [c("scale_flat")]),  # (rows,)
            helper.make_node("Shape", [c("scale_flat")], [c("n_rows")]),
            helper.make_node("Expand", [c("zero"), c("n_rows")], [c("zeros")]),
            helper.make_node("QuantizeLinear", [c("rows"), c("scale_flat"), c("zeros")], [c("q")], axis=0),
        ]
        shared[a] = q
    q = shared[a]
    # MatMulIntegerToFloat (onnxruntime's contrib op) applies the column scales inside MLAS's kernel
    nodes += [
        helper.make_node("MatMulIntegerToFloat", [f"{q}/q", f"{p}/wq", f"{q}/one", f"{p}/w_scale", f"{q}/zero"],
                         [f"{p}/col_scaled"], name=f"{p}/MatMulIntegerToFloat", domain="com.microsoft"),
        helper.make_node("Mul", [f"{p}/col_scaled", f"{q}/scale"], [f"{p}/rows_out"]),
        helper.make_node("Concat", [f"{q}/lead", f"{p}/n"], [f"{p}/out_shape"], axis=0),
        helper.make_node("Reshape", [f"{p}/rows_out", f"{p}/out_shape"], [y]),
    ]
    inits.append(numpy_helper.from_array(np.array([n], np.int64), f"{p}/n"))
    return nodes, inits


def rewrite_per_row(proto, names: set[str], reduce_range: bool) -> None:
    """Replace the float MatMuls `names` of `proto`'s top-level graph by int8 products with per-row scales."""
    if not names:
        return
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))  # MatMulIntegerToFloat
    weights = {i.name: i for i in graph.initializer}
    nodes, added, shared, replaced = [], [], {}, set()
    for node in graph.node:
        if node.op_type == "MatMul" and node.name in names:
            made, inits = per_row_product(node, numpy_helper.to_array(weights[node.input[1]]), reduce_range, opset, shared)
            nodes += made
            added += inits
            replaced.add(node.input[1])
        else:
            nodes.append(node)
    still_read = {i for n in nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    del graph.node[:]
    graph.node.extend(nodes)
