"""Export the decoder with state: `decoder.onnx` (steps) and `prefill.onnx` (prompts), same interface.

Both take new tokens and the state and return logits and the state's update (`decoder_io.py`); they
differ in how the convolution runs. `decoder.onnx` uses the direct form: for GatedDsConvLM it reads
the past slots, O(t * (C + t)), for the recurrent families it convolves the t new tokens only,
O(t^2), with the carried state added. Right for one token, or a few. `prefill.onnx` runs the
monarch form (over all C + t slots for GatedDsConvLM, over the t new tokens for the recurrent
families): the cost of a forward, right for a prompt or a long continuation.
"""
from __future__ import annotations

import onnx

from gss_runtime.decoder import DECODER_NAME, PREFILL_NAME

from ..errors import GSSExportError
from .decoder_io import StepGraph, input_names, output_names, step_signature
from .onnx import SUPPORTED_OPSETS, conv_translations, dynamo_export

# the runtime's file names
FILE, PREFILL_FILE = DECODER_NAME, PREFILL_NAME
# the conv form prefill.onnx runs over all slots: exact at every length, O(n^(4/3)) (`conv/monarch.py`)
PREFILL_FORM = "monarch"


def build_decoder(model, *, opset: int, prefill: bool = False) -> onnx.ModelProto:
    """The decoder graph (`prefill=True`: the prefill graph) with batch, new_tokens (and for an appended
    state, context >= 1) symbolic; inputs and outputs as `decoder_io.describe`."""
    if opset not in SUPPORTED_OPSETS:
        raise GSSExportError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}")
    c = model.config
    if c.max_seq_len < 2:
        raise GSSExportError("max_seq_len must be at least 2 for an export with a dynamic sequence axis")
    one_token = not prefill and c.step_tokens == 1  # the family's one-token step, (batch, 1) tokens
    example, dynamic = step_signature(c, one_token)
    target = StepGraph(model.with_conv(PREFILL_FORM if prefill else "direct"), whole=prefill, one_token=one_token).eval()
    # in-graph sizes in the prefill graph's conv: inferred intermediate shapes can be wrong (see onnx.trace_onnx)
    return dynamo_export(target, example, dynamic, opset=opset, inputs=input_names(c), outputs=output_names(c),
                         translation=conv_translations(c, opset) if prefill else None, drop_shapes=prefill,
                         what=" for the decoder")
