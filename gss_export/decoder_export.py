"""Export the decoder with state: `decoder.onnx` (steps) and `prefill.onnx` (prompts), same interface.

Both take new tokens + the past and return logits + the new entries; they differ in how the
convolution reads the past. `decoder.onnx` reads it directly, O(t * (C + t)): right for one token
(or a few) after any context. `prefill.onnx` runs the monarch form over all C + t slots at once, the
cost of a forward of C + t tokens: right for a prompt, or a long continuation. The state
is what a layer needs to continue (see `GatedDsConvLM.step`): per layer, the normalised conv
inputs and the kernel values of every slot so far, slot-major, so a runtime appends the returned
new entries to preallocated buffers and passes their filled part back without copying. A new
position costs O(context * dim_dsconv) in the convolution, reading the past once; everything
else is per position.
"""
from __future__ import annotations

import onnx
import torch

from gss_runtime.decoder import DECODER_NAME, PREFILL_ABOVE, PREFILL_NAME  # noqa: F401  (PREFILL_ABOVE: for export.py)

from .errors import GSSExportError
from .export_signatures import StepGraph, quiet_tracing, step_signature
from .model import GatedDsConvLM
from .onnx_export import SUPPORTED_OPSETS, conv_translations

# the runtime's names and its rule for when to use prefill.onnx (recorded in config.json for the others)
FILE, PREFILL_FILE = DECODER_NAME, PREFILL_NAME
# the conv form prefill.onnx runs over all slots: exact at every length, O(n^(4/3)) (`monarch.py`)
PREFILL_FORM = "monarch"


def input_names(depth: int) -> list[str]:
    return ["input_ids", "pad"] + [f"past_u.{i}" for i in range(depth)] + [f"past_k.{i}" for i in range(depth)]


def output_names(depth: int) -> list[str]:
    return ["logits"] + [f"new_u.{i}" for i in range(depth)] + [f"new_k.{i}" for i in range(depth)]


def decoder_io(model: GatedDsConvLM) -> dict:
    """Names, dtypes and shapes of the decoder's inputs and outputs (also stored in its metadata)."""
    c = model.config
    per_layer = lambda name, ctx, width: [  # noqa: E731
        {"name": f"{name}.{i}", "dtype": "float32", "shape": [ctx, "batch", width]} for i in range(c.depth)
    ]
    return {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "new_tokens"], "doc": "tokens for slots context..context+new_tokens-1"},
            {"name": "pad", "dtype": "int64", "shape": ["batch"], "doc": "slot of each row's position 0: padding slots before it are never read"},
            *per_layer("past_u", "context", c.dim_dsconv),
            *per_layer("past_k", "context", c.heads),
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", "new_tokens", c.num_tokens]},
            *per_layer("new_u", "new_tokens", c.dim_dsconv),
            *per_layer("new_k", "new_tokens", c.heads),
        ],
        "state_bytes_per_token": 4 * c.depth * (c.dim_dsconv + c.heads),
    }


def build_decoder(model: GatedDsConvLM, *, opset: int, prefill: bool = False) -> onnx.ModelProto:
    """The decoder graph (`prefill=True`: the prefill graph) with batch, new_tokens and context symbolic
    (context >= 1)."""
    if opset not in SUPPORTED_OPSETS:
        raise GSSExportError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}")
    c = model.config
    if c.max_seq_len < 2:
        raise GSSExportError("max_seq_len must be at least 2 for an export with a dynamic sequence axis")
    example, dynamic = step_signature(c)
    target = StepGraph(model.with_conv(PREFILL_FORM if prefill else "direct"), whole=prefill).eval()
    with quiet_tracing():
        program = torch.onnx.export(
            target,
            example,
            dynamo=True,
            opset_version=opset,
            input_names=input_names(c.depth),
            output_names=output_names(c.depth),
            dynamic_shapes=dynamic,
            custom_translation_table=conv_translations(c, opset) if prefill else {},
            verbose=False,
        )
    proto = program.model_proto
    if prefill:  # in-graph sizes: inferred intermediate shapes can be wrong (see onnx_export.trace_onnx)
        del proto.graph.value_info[:]
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise GSSExportError(f"the exporter could not produce opset {opset} for the decoder (it gave {got}); try --opset {got}")
    return proto
