"""Export to a torch.export archive: `model.pt2` holding the programs `model` (forward), `step` and `prefill`.

`torch.export.load(path)` gives the forward program, dynamic in batch and length (up to
max_seq_len); `load_pt2(path).exported_programs["step"]` the incremental decoder, with the ONNX
decoder's interface (a past of at least one slot). The FFT conv runs as plain aten FFT ops at
length 2n (`conv.forms.fft2n_causal_conv`), which torch.export keeps symbolic; the aoti target
compiles the same programs (`aoti.py`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.export import ExportedProgram

from .. import __version__
from ..conv.forms import resolve_form
from ..errors import GSSExportError
from .decoder_io import StepGraph, step_signature
from .signatures import MAX_BATCH, forward_signature, quiet_tracing

if TYPE_CHECKING:  # annotations only: the targets read what they need from the model they are given
    from ..families import GatedLM

FILE = "model.pt2"
PROGRAMS = ("model", "step", "prefill")


def export_settings(model: GatedLM, *, conv: str, fmt: str = "pt2") -> dict:
    return {
        "format": fmt,
        "file": FILE,
        "conv": torch_export_form(conv, fmt),
        "conv_requested": conv,
        "programs": list(PROGRAMS),
        "dtype": "float32",
        "gss_export_version": __version__,
        "torch_version": torch.__version__,
    }


def torch_export_form(conv: str, fmt: str) -> str:
    try:
        return resolve_form(conv, fmt)
    except ValueError as e:
        raise GSSExportError(str(e)) from None


def build_programs(model: GatedLM, *, conv: str = "auto", fmt: str = "pt2", max_batch: int = MAX_BATCH,
                   step_max_new: int | None = None) -> dict[str, ExportedProgram]:
    """{"model": forward, "step": StepGraph, "prefill": StepGraph(whole=True)} exported with batch (up to max_batch),
    length and context symbolic; step_max_new bounds the new tokens `step` takes (default: max_seq_len)."""
    if model.config.max_seq_len < 2:
        raise GSSExportError("max_seq_len must be at least 2 for an export with a dynamic sequence axis")
    target = model.with_conv(torch_export_form(conv, fmt))
    fwd_example, fwd_dynamic = forward_signature(model.config, max_batch=max_batch)
    step_example, step_dynamic = step_signature(model.config, max_batch=max_batch)
    short_example, short_dynamic = ((step_example, step_dynamic) if step_max_new is None else
                                    step_signature(model.config, max_batch=max_batch, max_new=step_max_new))
    with quiet_tracing():
        return {
            "model": torch.export.export(target, fwd_example, dynamic_shapes=fwd_dynamic),
            # the step's convolution is the direct product over the past at any form; prefill runs the
            # target's form over all slots
            "step": torch.export.export(StepGraph(target).eval(), short_example, dynamic_shapes=short_dynamic),
            "prefill": torch.export.export(StepGraph(target, whole=True).eval(), step_example, dynamic_shapes=step_dynamic),
        }


def save_pt2(programs: dict[str, ExportedProgram], path: Path, metadata: dict) -> None:
    from torch.export.pt2_archive._package import package_pt2

    package_pt2(str(path), exported_programs=programs, extra_files={"config.json": json.dumps(metadata)})


def load_pt2_program(path: Path, name: str = "model") -> torch.nn.Module:
    """The program `name` ("model": forward, "step" or "prefill") from a model.pt2 written by `save_pt2`, as a module."""
    from torch.export.pt2_archive._package import load_pt2

    with quiet_tracing():
        return load_pt2(str(path)).exported_programs[name].module()
