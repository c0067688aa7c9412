"""Export the decoder with state (`decoder.onnx`): new tokens + state in, logits + new state out.

One graph serves a prompt of many tokens (empty state, context 0) and a step of one. The state
is what a layer needs to continue (see `GatedDsConvLM.step`): per layer, the normalised conv
inputs and the kernel values of every position so far. A new position costs O(context * dim_dsconv)
in the convolution; everything else is per position.
"""
from __future__ import annotations

import onnx
import torch
from torch import nn

from .errors import GSSExportError
from .model import GatedDsConvLM
from .onnx_export import SUPPORTED_OPSETS, _quiet_exporter

FILE = "decoder.onnx"


def decoder_io(model: GatedDsConvLM) -> dict:
    """Names, dtypes and shapes of the decoder's inputs and outputs (also stored in its metadata)."""
    c = model.config
    return {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "new_tokens"]},
            {"name": "positions", "dtype": "int64", "shape": ["batch"],
             "doc": "absolute position of each row's first new token = how many of its tokens the state holds"},
            {"name": "conv_u", "dtype": "float32", "shape": [c.depth, "batch", "context", c.dim_dsconv]},
            {"name": "conv_k", "dtype": "float32", "shape": [c.depth, "batch", "context", c.heads]},
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", "new_tokens", c.num_tokens]},
            {"name": "conv_u_out", "dtype": "float32", "shape": [c.depth, "batch", "context + new_tokens", c.dim_dsconv]},
            {"name": "conv_k_out", "dtype": "float32", "shape": [c.depth, "batch", "context + new_tokens", c.heads]},
        ],
        "state_bytes_per_token": 4 * c.depth * (c.dim_dsconv + c.heads),
    }


class _DecoderGraph(nn.Module):
    """`model.step` as a module's forward, so the exporter sees named tensor inputs."""

    def __init__(self, model: GatedDsConvLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, conv_u, conv_k):
        return self.model.step(input_ids, positions, conv_u, conv_k)


def build_decoder(model: GatedDsConvLM, *, opset: int) -> onnx.ModelProto:
    """The decoder graph with batch, new_tokens and context symbolic (context may be 0)."""
    if opset not in SUPPORTED_OPSETS:
        raise GSSExportError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}")
    c = model.config
    if c.max_seq_len < 2:
        raise GSSExportError("max_seq_len must be at least 2 for an export with a dynamic sequence axis")
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    new = torch.export.Dim("new_tokens", min=1, max=c.max_seq_len)
    context = torch.export.Dim("context", min=0, max=c.max_seq_len)
    # example sizes >= 2 and distinct, so no axis specialises or gets tied to another
    example = (
        torch.zeros(2, 3, dtype=torch.long),
        torch.tensor([5, 4]),
        torch.zeros(c.depth, 2, 5, c.dim_dsconv),
        torch.zeros(c.depth, 2, 5, c.heads),
    )
    with _quiet_exporter():
        program = torch.onnx.export(
            _DecoderGraph(model.with_conv("direct")).eval(),
            example,
            dynamo=True,
            opset_version=opset,
            input_names=["input_ids", "positions", "conv_u", "conv_k"],
            output_names=["logits", "conv_u_out", "conv_k_out"],
            dynamic_shapes={
                "input_ids": {0: batch, 1: new},
                "positions": {0: batch},
                "conv_u": {1: batch, 2: context},
                "conv_k": {1: batch, 2: context},
            },
            verbose=False,
        )
    proto = program.model_proto
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise GSSExportError(f"the exporter could not produce opset {opset} for the decoder (it gave {got}); try --opset {got}")
    return proto
