"""Reduced-precision variants of an ONNX export, built with onnxruntime's own tools.

- `fp16`: onnxruntime's float16 converter (`onnxruntime.transformers.float16`). Candidates for
  float16 compute are the per-position layers: the Linear products (MatMul by a weight, its bias
  Add), LayerNormalization, Gelu and the embedding Gather. Everything else stays float32: the
  causal convolution (its spectral products pass fp16's 65504 at 2048 tokens and its Cos/Sin
  table angles need more than fp16's 11 bits) and the gating / residual arithmetic around it.
  A candidate whose operator has no float16 kernel in onnxruntime's CPU provider also stays
  float32; which ones is probed at export time, by what onnxruntime itself inserts casts for.
  Every weight is stored as float16 either way (a Cast back to float32 is folded at load).
  `input_ids` stays int64 and every float input and output float32, so runtimes need no change.
- `int8`: `quant_pre_process` (shape inference + onnxruntime's graph optimisation, as
  onnxruntime recommends before quantizing), then `quantize_dynamic` (int8 weights, activations
  quantized per call with one scale per tensor) for the products of normalised inputs and the
  embedding, and int8 products with one activation scale per row (`int8_products`, on
  onnxruntime's QuantizeLinear and MatMulIntegerToFloat) for the products whose inputs have
  outlier positions (see `quantize_int8`). The weight range follows the CPU's int8 kernels
  (`int8_products.resolve_target`). Products narrower than 16 columns and activation x activation
  products (the convolution) stay float32.

The library returns values and prints nothing.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..artifacts import save_onnx
from ..errors import GSSExportError
from .int8_products import resolve_target, rewrite_per_row

VARIANTS = ("fp16", "int8")
# candidates for float16 compute: the per-position layers (see the module docstring)
PER_POSITION_OPS = ("MatMul", "Gemm", "Add", "LayerNormalization", "Gelu", "Gather")
INSERTED_CAST = "InsertedPrecisionFreeCast_"  # onnxruntime's name for casts around fp32-only kernels
WHY = {
    "no_fp16_kernel": "no float16 kernel in onnxruntime's CPU provider (probed: onnxruntime would cast around it)",
    "sequence_mixing": "the causal convolution, its Cos/Sin tables and the gating/residual arithmetic: "
                       "spectral products exceed float16's range at long lengths, table angles its precision",
}
INT8_ACTIVATIONS = ("auto", "per-row", "per-tensor")
# producers whose outputs one scale per tensor fits: normalised per position, bounded (max/RMS 4-7 measured)
NORMALISED = ("LayerNormalization", "Gelu")
NARROW = 16  # products with fewer output columns stay float32 (WHY_INT8["narrow"])
WHY_INT8 = {
    "narrow": "fewer than 16 output columns (the convolution kernel's projection to heads): int8 gains nothing at that "
              "width, and its error reaches every position through the kernel (top-1 0.976 -> 0.964 on the example)",
    "normalised": "its input comes out of LayerNormalization or Gelu: bounded per position, one scale per tensor fits",
    "outliers": "its input is a sum (convolution output, gated product) with rare positions 10-30x the RMS: "
                "one scale per tensor would lose the rest, so one scale per row",
    "per-row": "--int8-activations per-row: one activation scale per row everywhere",
    "per-tensor": "--int8-activations per-tensor: one activation scale per tensor everywhere (fastest, least accurate)",
    "float": "activation x activation products (the convolution) have no weight to quantize: float32",
}


def file_bytes(path: Path) -> int:
    """Size of an ONNX file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def save_variant(proto: onnx.ModelProto, variant: str, path: Path, external_data: bool | None = None, **options) -> dict:
    """Write `variant` of the float32 `proto` to `path`; returns what was done, with both file sizes.

    `proto` keeps its metadata (configuration, settings) and gains `gss_export.variant`.
    """
    if variant not in VARIANTS:
        raise GSSExportError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix=".gss-variant-", dir=path.parent) as tmp:
        work = Path(tmp)
        fp32_path = work / path.name
        # what a float32 export writes, the size to compare with (a copy: saving as external data empties the tensors)
        save_onnx(copy.deepcopy(proto), fp32_path, external_data)
        fp32_bytes = file_bytes(fp32_path)
        built, record = to_float16(proto, work) if variant == "fp16" else quantize_int8(fp32_path, work, **options)
    del built.metadata_props[:]
    built.metadata_props.extend(proto.metadata_props)
    entry = built.metadata_props.add()  # beside the configuration and settings that annotate() stored
    entry.key, entry.value = "gss_export.variant", json.dumps(record)
    built.producer_name, built.producer_version, built.doc_string = proto.producer_name, proto.producer_version, proto.doc_string
    save_onnx(built, path, external_data)
    record.update(onnxruntime_version=_ort_version(), fp32_bytes=fp32_bytes, bytes=file_bytes(path))
    record["size_ratio"] = record["bytes"] / fp32_bytes
    return record


def to_float16(proto: onnx.ModelProto, work: Path) -> tuple[onnx.ModelProto, dict]:
    """The float16 variant of `proto` and what it did: fp16 ops, fp32 ops by reason (counts by op type)."""
    from onnxruntime.transformers import float16

    proto = copy.deepcopy(proto)
    _name_nodes(proto)
    floats = {i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT}
    ops = {n.name: n.op_type for n in proto.graph.node}
    candidates = {n.name for n in proto.graph.node if _per_position(n, floats)}
    no_kernel: set[str] = set()
    for _ in range(len(PER_POSITION_OPS) + 1):  # each round drops at least one operator type
        fp16 = {n for n in candidates if ops[n] not in no_kernel}
        blocked = [n.name for n in proto.graph.node if n.name not in fp16]
        # op_block_list=[]: node_block_list alone decides; value_info is re-inferred by the converter
        converted = float16.convert_float_to_float16(copy.deepcopy(proto), keep_io_types=True, op_block_list=[], node_block_list=blocked)
        _tidy(converted)
        fallbacks = {ops[n] for n in _run_in_fp32(converted, fp16, work)}
        if not fallbacks:
            break
        no_kernel |= fallbacks
    weights = {i for n in proto.graph.node if n.name in candidates for i in n.input if i in floats}
    _store_as_fp16(converted, weights)
    del converted.graph.value_info[:]  # onnxruntime infers types itself; stale shapes have bitten before (see build_onnx)
    kept = {"no_fp16_kernel": Counter(), "sequence_mixing": Counter()}
    for n in proto.graph.node:
        if n.name not in fp16 and _has_float_output(n):
            kept["no_fp16_kernel" if n.name in candidates else "sequence_mixing"][n.op_type] += 1
    return converted, {
        "variant": "fp16",
        "dtype": "float16",
        "fp16_ops": dict(Counter(ops[n] for n in fp16)),
        "fp32_ops": {reason: dict(counts) for reason, counts in kept.items()},
        "fp32_reasons": WHY,
        "weights_fp16": len(weights),
    }


def quantize_int8(fp32_path: Path, work: Path, activations: str = "auto", weight_type: str = "QInt8",
                  per_channel: bool = True, cpu: str | dict = "auto") -> tuple[onnx.ModelProto, dict]:
    """Dynamic int8 quantization of the model at `fp32_path`; returns the model and what was quantized.

    Every weight product of at least NARROW columns gets int8 weights (one scale per output column)
    and int8 activations quantized at run time. How the activations are scaled depends on where
    they come from: one scale per tensor (`quantize_dynamic`'s DynamicQuantizeMatMul) suits the
    outputs of LayerNormalization and Gelu; sums (the convolution's output, the gated product, the
    residual stream) have rare positions 10-30x their RMS, and one scale per tensor loses everything
    else (top-1 agreement 0.81 on the example), so with activations="auto" those get one scale per
    row (`int8_products`). "per-row" and "per-tensor" use one kind everywhere. `cpu` ("auto": probed
    on this machine; or `resolve_target`'s answer) sets the weight range: full on VNNI, [-64, 64] on
    AVX2 (see `int8_products`).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if weight_type not in ("QInt8", "QUInt8"):
        raise GSSExportError(f"int8 weight type must be QInt8 or QUInt8, got {weight_type!r}")
    if activations not in INT8_ACTIVATIONS:
        raise GSSExportError(f"int8 activations must be one of {', '.join(INT8_ACTIVATIONS)}, got {activations!r}")
    target = cpu if isinstance(cpu, dict) else resolve_target(cpu)
    reduce_range = target["target"] == "avx2"
    pre, dynamic_out = work / "pre.onnx", work / "dynamic.onnx"
    # symbolic shape inference cannot follow the sizes computed in-graph (it would fail, and leave
    # sym_shape_infer_temp.onnx in the working directory); onnx shape inference + optimisation run
    external = fp32_path.with_name(fp32_path.name + ".data").exists()  # weights beside the model: keep them there
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
    model = onnx.load(str(pre), load_external_data=False)
    consts = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    made = {o: n.op_type for n in model.graph.node for o in n.output}
    products = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    tables = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in consts]
    scheme, why = {}, {}
    for n in products:
        if shapes[n.input[1]][-1] < NARROW:
            scheme[n.name], why[n.name] = "float32", "narrow"
        elif activations == "auto":
            normalised = made.get(n.input[0]) in NORMALISED
            scheme[n.name], why[n.name] = ("per-tensor", "normalised") if normalised else ("per-row", "outliers")
        else:
            scheme[n.name], why[n.name] = activations, activations
    per_tensor = [n for n, s in scheme.items() if s == "per-tensor"]
    per_row = {n for n, s in scheme.items() if s == "per-row"}
    dynamic = per_tensor + tables
    if dynamic:  # an empty nodes_to_quantize would mean "every node" to quantize_dynamic
        with _quiet_logs():
            quantize_dynamic(
                str(pre), str(dynamic_out), weight_type=getattr(QuantType, weight_type), per_channel=per_channel,
                reduce_range=reduce_range, op_types_to_quantize=["MatMul", "Gather"], nodes_to_quantize=dynamic,
                extra_options={"MatMulConstBOnly": True}, use_external_data_format=external,
            )
    quantized = onnx.load(str(dynamic_out if dynamic else pre))
    rewrite_per_row(quantized, per_row, reduce_range)
    del quantized.graph.value_info[:]
    return quantized, {
        "variant": "int8",
        "dtype": "float32 activations between layers, int8 weights and int8 products",
        "method": "onnxruntime.quantization: quant_pre_process; quantize_dynamic (per-tensor products, embedding); "
                  "quantize_data weights with QuantizeLinear and MatMulIntegerToFloat (per-row products)",
        "activations": activations,
        "weight_type": weight_type, "per_channel": per_channel,
        "cpu": target,
        "per_tensor_activations": {"MatMul": len(per_tensor), "Gather": len(tables)},
        "per_row_activations": {"MatMul": len(per_row)},
        "float_weight_products": sum(s == "float32" for s in scheme.values()),
        "products": [{"node": n.name, "weight": shapes[n.input[1]], "input_from": made.get(n.input[0], "graph input"),
                      "precision": "float32" if scheme[n.name] == "float32" else f"int8, {scheme[n.name]} activations",
                      "why": why[n.name]} for n in products],
        "why": {key: WHY_INT8[key] for key in sorted(set(why.values()))},
        "float_products": sum(n.op_type == "MatMul" and n.input[1] not in consts for n in model.graph.node),
        "float_products_why": WHY_INT8["float"],
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@contextlib.contextmanager
def _quiet_logs():
    """onnxruntime's quantization tools log every node at INFO; the library reports through return values."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def _per_position(node: onnx.NodeProto, floats: set[str]) -> bool:
    """A node of a per-position layer: a product by a weight matrix, a bias, a norm, GELU, the embedding."""
    if node.op_type in ("MatMul", "Gemm"):
        return len(node.input) > 1 and node.input[1] in floats
    if node.op_type == "Add":
        return any(i in floats for i in node.input)
    if node.op_type == "Gather":
        return node.input[0] in floats
    return node.op_type in PER_POSITION_OPS


def _has_float_output(node: onnx.NodeProto) -> bool:
    """Whether `node` computes floats (not sizes, indices or masks); by op type and, for Cast, its target."""
    if node.op_type == "Cast":
        return next(a.i for a in node.attribute if a.name == "to") == TensorProto.FLOAT
    return node.op_type not in ("Shape", "Size", "Range", "ArgMax", "Mod", "Equal", "Greater", "GreaterOrEqual", "Less",
                                "LessOrEqual", "Or", "And", "Not")


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Unique names for every node: the converter's block list is by name."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_gss"
        seen.add(node.name)


def _tidy(proto: onnx.ModelProto) -> None:
    """Undo what the converter does between two float32 nodes, then drop what is no longer used.

    The converter casts every blocked node's float output to float16 and back to float32 at each
    blocked consumer (a precision loss between two float32 nodes), and emits one identical cast
    per blocked consumer of a value (duplicate names). Its own casts are recognised by name.
    """
    graph = proto.graph
    nodes, seen = [], set()
    for node in graph.node:
        key = (node.name, tuple(node.output))
        if key not in seen:
            seen.add(key)
            nodes.append(node)
    made = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in graph.output}
    bypass = {}
    for node in nodes:
        up = made.get(node.input[0]) if node.op_type == "Cast" else None
        to_fp32 = node.name.endswith("_cast_to_fp32_node") or node.name.startswith("graph_output_cast")
        if to_fp32 and up is not None and (up.name.endswith("_cast_to_fp16_node") or up.name.startswith("graph_input_cast")):
            if node.output[0] in outputs:
                node.input[0] = up.input[0]  # float32 -> float32: a no-op Cast that keeps the output's name
            else:
                bypass[node.output[0]] = up.input[0]
    for node in nodes:
        node.input[:] = [bypass.get(i, i) for i in node.input]
    needed = {o.name for o in graph.output}
    while True:  # drop nodes nothing reads (the casts just bypassed), until none is left
        reads = needed | {i for n in nodes for i in n.input}
        alive = [n for n in nodes if any(o in reads for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del graph.node[:]
    graph.node.extend(nodes)


def _run_in_fp32(proto: onnx.ModelProto, fp16: set[str], work: Path) -> set[str]:
    """Names of `fp16` nodes that onnxruntime's CPU provider would run in float32.

    The session is created with graph optimisations off and its graph written out: casts named
    InsertedPrecisionFreeCast_* feed nodes without a float16 kernel, and a node that is gone was
    expanded into its function body (e.g. Gelu) for the same reason.
    """
    import onnxruntime as ort

    src, placed = work / "probe.onnx", work / "probe_placed.onnx"
    save_onnx(proto, src)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(placed)
    options.log_severity_level = 3
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", placed.name + ".data")
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise GSSExportError(f"onnxruntime cannot load the float16 graph: {str(e).splitlines()[0][:300]}") from None
    graph = onnx.load(str(placed), load_external_data=False).graph
    inserted = {o for n in graph.node if n.name.startswith(INSERTED_CAST) for o in n.output}
    present = {n.name for n in graph.node}
    in_fp32 = {n.name for n in graph.node if n.name in fp16 and any(i in inserted for i in n.input)}
    return in_fp32 | {name for name in fp16 if name not in present}


def _store_as_fp16(proto: onnx.ModelProto, names: set[str]) -> None:
    """Store the float32 initializers `names` as float16, read through a Cast to float32.

    onnxruntime folds the Cast when it loads the model, so the weights cost half the file and no
    time; initializers outside the per-position layers (e.g. 2*pi of the tables) stay float32.
    """
    from onnxruntime.transformers.float16 import convert_tensor_float_to_float16

    casts = []
    for init in proto.graph.initializer:
        if init.name in names and init.data_type == TensorProto.FLOAT:
            stored = init.name + "_fp16"
            casts.append(helper.make_node("Cast", [stored], [init.name], name=f"{stored}_to_fp32", to=TensorProto.FLOAT))
            convert_tensor_float_to_float16(init)
            init.name = stored
    nodes = casts + list(proto.graph.node)  # the casts first: nodes stay in topological order
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
