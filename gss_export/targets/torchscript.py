"""Export to TorchScript: `model.pt` whose forward(input_ids: int64 [b, n]) returns logits at any length.

Beside forward it carries `step(input_ids, pad, past_u, past_k)` and `empty_state(batch)`
(`GatedLM.step`), so a C++ service decodes one position per token (runtime/cpp).

The model is scripted, not traced: tracing bakes the sequence length into the FFT size and
arange calls, scripting keeps the length a runtime value. Needs no Python at load time
(`torch::jit::load` in C++ works), so the FFT form runs its plain torch.fft code here.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import __version__
from ..conv.forms import resolve_form

if TYPE_CHECKING:  # annotations only: the targets read what they need from the model they are given
    from ..families import GatedLM


def export_settings(model: GatedLM, *, conv: str) -> dict:
    return {
        "format": "torchscript",
        "file": "model.pt",
        "conv": resolve_form(conv, "torchscript"),
        "conv_requested": conv,
        "dtype": "float32",
        "gss_export_version": __version__,
        "torch_version": torch.__version__,
    }


def build_torchscript(model: GatedLM, *, conv: str = "auto") -> torch.jit.ScriptModule:
    """Script `model` under the chosen conv form (weights reused)."""
    target = model.with_conv(resolve_form(conv, "torchscript"))
    with warnings.catch_warnings():
        # torch 2.x deprecates TorchScript; it is still what many C++ services load
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(target)


def save_torchscript(scripted: torch.jit.ScriptModule, path: Path, metadata: dict) -> None:
    """Save with the metadata as an extra file (`config.json` inside the archive)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, str(path), _extra_files={"config.json": json.dumps(metadata)})


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()
