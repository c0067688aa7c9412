"""Greedy-generate bytes from the example checkpoint (examples/byte_lm), recomputing the full prefix each step.

    python examples/sample_byte_lm.py --prompt "The for statement" --bytes 80
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from gss_export.families import GatedDsConvLM, DsConvConfig

HERE = Path(__file__).resolve().parent


def load_byte_lm(directory: Path = HERE / "byte_lm", conv: str = "fft") -> GatedDsConvLM:
    """The trained checkpoint, strict-loaded (upstream key names), in eval mode."""
    config = DsConvConfig(**json.loads((directory / "training.json").read_text())["config"])
    model = GatedDsConvLM(config, conv=conv)
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model.eval()


@torch.no_grad()
def greedy(model: GatedDsConvLM, prompt: bytes, n_bytes: int) -> bytes:
    ids = list(prompt)
    for _ in range(n_bytes):  # no state caching: the convolution is recomputed over the whole prefix
        logits = model(torch.tensor([ids], dtype=torch.long))
        ids.append(int(logits[0, -1].argmax()))
    return bytes(ids[len(prompt):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="The for statement")
    p.add_argument("--bytes", type=int, default=80)
    p.add_argument("--dir", type=Path, default=HERE / "byte_lm")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = greedy(load_byte_lm(args.dir), args.prompt.encode("utf-8"), args.bytes)
    print(repr(args.prompt + out.decode("utf-8", errors="replace")))


if __name__ == "__main__":
    main()
