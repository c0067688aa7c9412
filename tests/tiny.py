"""Tiny models for the reliability tests (interruption, concurrency, fuzzing, long runs): a checkpoint and an
ONNX export that cost seconds, made once per test session however many test files use them."""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(num_tokens=256, dim=16, depth=1, heads=2, dim_dsconv=8, dim_expansion_factor=2)
TINY_MAX_LEN = 32  # small, so that --on-limit slide is reached within a few tokens
_made: dict = {}


def tiny_state_dict() -> dict[str, torch.Tensor]:
    """Upstream GatedDsConvLM's weights (seeded) at the TINY sizes."""
    from gated_state_spaces_pytorch import GatedDsConvLM

    torch.manual_seed(3)
    return GatedDsConvLM(**TINY).state_dict()


def tiny_checkpoint(tmp_path_factory, suffix: str = ".pt") -> Path:
    """The tiny state dict saved as .pt (torch.save) or .safetensors."""
    if suffix not in _made:
        path = tmp_path_factory.mktemp("tiny_ckpt") / f"tiny{suffix}"
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tiny_state_dict(), str(path))
        else:
            torch.save(tiny_state_dict(), path)
        _made[suffix] = path
    return _made[suffix]


def tiny_onnx(tmp_path_factory) -> Path:
    """The tiny model exported to ONNX (model, decoder and prefill graphs; not validated: the parity tests do that)."""
    if "onnx" not in _made:
        from gss_export.checkpoint import load_checkpoint
        from gss_export.export import export_model

        out = tmp_path_factory.mktemp("tiny_onnx")
        model = load_checkpoint(tiny_checkpoint(tmp_path_factory), max_seq_len=TINY_MAX_LEN).model
        export_model(model, "onnx", out, conv="direct", validate=False)
        _made["onnx"] = out
    return _made["onnx"]


def fuzz(examples: int):
    """Hypothesis settings for the fuzz tests: derandomized (the same examples every run, so CI is
    reproducible) and bounded; GSS_FUZZ_SCALE=10 runs ten times as many, for a deeper search by hand."""
    import os

    from hypothesis import HealthCheck, settings

    scale = float(os.environ.get("GSS_FUZZ_SCALE", "1"))
    return settings(derandomize=True, deadline=None, max_examples=max(1, int(examples * scale)),
                    suppress_health_check=list(HealthCheck), print_blob=False, database=None)
