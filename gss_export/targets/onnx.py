"""Export to ONNX: `input_ids` int64 [batch, sequence] -> `logits` float32 [batch, sequence, num_tokens]."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import onnx
import torch

from .. import DEFAULT_OPSET, __version__
from ..conv.forms import SWITCH_FORMS, SWITCH_LENGTH, resolve_form
from ..conv.length_switch import switch_by_length
from ..conv.onnx_fft import fft_conv_translation
from ..conv.onnx_monarch import monarch_conv_translation
from ..errors import GSSExportError
from .signatures import forward_signature, quiet_tracing

if TYPE_CHECKING:  # annotations only: the targets read what they need from the model they are given
    from ..families import GatedLM

# torch's dynamo exporter builds at opset 18 at least and converts down from there
BUILD_MIN_OPSET = 18
SUPPORTED_OPSETS = range(17, 24)

INPUTS = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]


def outputs_spec(num_tokens: int) -> list[dict]:
    return [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", num_tokens]}]


def export_settings(model: GatedLM, *, conv: str, opset: int) -> dict:
    form = resolve_form(conv, "onnx")
    return {
        "format": "onnx",
        "file": "model.onnx",
        "conv": form,
        "conv_requested": conv,
        **({"conv_switch": {"up_to": SWITCH_LENGTH, "short": SWITCH_FORMS[0], "long": SWITCH_FORMS[1]}} if form == "switch" else {}),
        "opset": opset,
        "dtype": "float32",
        "gss_export_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }


def build_onnx(model: GatedLM, *, conv: str = "auto", opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Trace `model` (any form; weights are reused) under the chosen conv form into an ONNX model.

    Batch and sequence axes stay symbolic; sequence is bounded by `config.max_seq_len`.
    """
    if opset not in SUPPORTED_OPSETS:
        raise GSSExportError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}")
    form = resolve_form(conv, "onnx")
    cfg = model.config
    if cfg.max_seq_len < 2:
        raise GSSExportError("max_seq_len must be at least 2 for an export with a dynamic sequence axis")
    if form == "switch":
        short, long = (build_onnx(model, conv=f, opset=opset) for f in SWITCH_FORMS)
        return switch_by_length(short, long, SWITCH_LENGTH)
    return trace_onnx(model.with_conv(form), opset=opset, translation=conv_translations(cfg, opset))


def conv_translations(cfg, opset: int) -> dict:
    """The ONNX translations of the conv forms' custom ops for a model of `cfg` at `opset`."""
    build_opset = max(opset, BUILD_MIN_OPSET)
    heads, head_dim = cfg.conv_geometry()
    return {
        torch.ops.gss_export.fft_causal_conv.default: fft_conv_translation(build_opset),
        torch.ops.gss_export.monarch_causal_conv.default: monarch_conv_translation(
            build_opset, head_dim=head_dim, heads=heads
        ),
    }


def trace_onnx(target: GatedLM, *, opset: int, translation: dict | None = None) -> onnx.ModelProto:
    """The dynamo export of `target` as it is (its conv modules included), batch and length symbolic.

    `translation`: ONNX translations of the custom ops its conv form uses (`build_onnx` passes them).
    """
    cfg = target.config
    example, dynamic = forward_signature(cfg)
    # Inferred intermediate shapes can be wrong when DFT's length is computed in-graph
    # (onnxruntime then fails with "Shape mismatch attempting to re-use buffer" at opset 20).
    proto = dynamo_export(target, example, dynamic, opset=opset, inputs=["input_ids"], outputs=["logits"],
                          translation=translation, drop_shapes=True)
    _rename_symbolic_dims(proto, num_tokens=cfg.num_tokens)
    return proto


def dynamo_export(target: torch.nn.Module, example: tuple, dynamic, *, opset: int, inputs: list[str], outputs: list[str],
                  translation: dict | None = None, drop_shapes: bool = False, what: str = "") -> onnx.ModelProto:
    """torch.onnx's dynamo export at exactly `opset` (GSSExportError otherwise); drop_shapes: forget the
    inferred intermediate shapes (wrong where sizes are computed in-graph, see `trace_onnx`)."""
    with quiet_tracing():
        program = torch.onnx.export(
            target,
            example,
            dynamo=True,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic,
            custom_translation_table=translation or {},
            verbose=False,
        )
    proto = program.model_proto
    if drop_shapes:
        del proto.graph.value_info[:]
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if got != opset:
        raise GSSExportError(f"the exporter could not produce opset {opset}{what} (it gave {got}); try --opset {got}")
    return proto


def annotate(proto: onnx.ModelProto, metadata: dict) -> None:
    """Store the configuration and export settings in the model's metadata_props (JSON values)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = f"gss_export.{key}"
        entry.value = json.dumps(value)
    proto.producer_name = "gss-export"
    proto.producer_version = __version__
    proto.doc_string = "gated-state-spaces LM: input_ids int64 [batch, sequence] -> logits float32 [batch, sequence, num_tokens]"


def _rename_symbolic_dims(proto: onnx.ModelProto, *, num_tokens: int) -> None:
    """Give the graph's inputs and outputs the documented axis names."""
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    for value, names in ((inp, ["batch", "sequence"]), (out, ["batch", "sequence", None])):
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if name is not None:
                dim.dim_param = name
            else:
                dim.dim_value = num_tokens
