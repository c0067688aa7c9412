"""Export to TorchScript: `model.pt` whose forward(input_ids: int64 [b, n]) returns logits at any length.

Beside forward it carries `step(input_ids, pad, past_u, past_k)` and `empty_state(batch)`
(`GatedDsConvLM.step`), so a C++ service decodes one position per token (runtime/cpp).

The model is scripted, not traced: tracing bakes the sequence length into the FFT size and
arange calls, scripting keeps the length a runtime value. Needs no Python at load time
(`torch::jit::load` in C++ works), so the FFT form runs its plain torch.fft code here.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .conv_forms import resolve_form
from .model import GatedDsConvLM


def export_settings(model: GatedDsConvLM, *, conv: str) -> dict:
    return {
        "format": "torchscript",
        "file": "model.pt",
        "conv": resolve_form(conv, "torchscript"),
        "conv_requested": conv,
        "dtype": "float32",
        "gss_export_version": __version__,
        "torch_version": torch.__version__,
    }


def build_torchscript(model: GatedDsConvLM, *, conv: str = "auto") -> torch.jit.ScriptModule:
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


class ScriptedDecoder:
    """Incremental decoding through a loaded model.pt's `step`, with numpy in and out (for validation).

    Mirrors `gss_runtime.Decoder`'s interface: a state is (pad, past_u, past_k); feeding returns
    new lists and leaves the old state usable.
    """

    def __init__(self, scripted: torch.jit.ScriptModule):
        self.scripted = scripted

    def empty_state(self, pads):
        pad = torch.as_tensor(np.asarray(pads, np.int64))
        return (pad, *self.scripted.empty_state(len(pad)))

    def feed(self, input_ids, state):
        """input_ids (b, t) -> logits (b, t, num_tokens) numpy, new state."""
        pad, past_u, past_k = state
        with torch.no_grad():
            logits, new_u, new_k = self.scripted.step(torch.as_tensor(np.asarray(input_ids, np.int64)), pad, past_u, past_k)
        grown = [[torch.cat([old, new]) for old, new in zip(past, entries)] for past, entries in ((past_u, new_u), (past_k, new_k))]
        return logits.numpy(), (pad, *grown)

    def step(self, tokens, state):
        """tokens (b,) -> logits (b, num_tokens), new state."""
        logits, state = self.feed(np.asarray(tokens, np.int64).reshape(-1, 1), state)
        return logits[:, 0], state
