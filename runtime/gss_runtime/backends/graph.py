"""The one interface every backend gives the runtime: an opened .onnx file (`Graph`).

Torch-free: numpy only here; each backend module imports its own engine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# how a backend's idle threads wait (onnxruntime's settings; OpenVINO's CPU threads manage themselves):
# spinning between calls too (the default), spinning between the operators of a call only, or never
SPIN_ALWAYS, SPIN_IN_CALL, SPIN_NEVER = "always", "in_call", "never"


class Graph:
    """One exported .onnx file opened by a backend.

    Attributes: `path`; `inputs` and `outputs` as (name, dims) pairs in the file's order, a dim an int
    or None where the file leaves it dynamic; `backend` ("onnxruntime", "openvino"); `precision` ("f32",
    "bf16"); `devices` (what runs it, most preferred first: onnxruntime's providers, or OpenVINO's
    device with its precision).
    """

    path: Path
    inputs: list[tuple[str, list]]
    outputs: list[tuple[str, list]]
    backend: str
    precision: str = "f32"
    devices: list[str]

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.outputs]

    def meta(self, key: str) -> str | None:
        """The file's metadata entry `key` (gss-export writes its config and state contract there), or None."""
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in the file's order, as arrays the caller owns. Thread-safe."""
        raise NotImplementedError

    def run_into(self, feeds: dict[str, np.ndarray], into: dict[str, np.ndarray]) -> np.ndarray:
        """The first output (logits), with the outputs named in `into` written straight into those
        C-contiguous float32 arrays of exactly their shapes (slices of the decoder's state buffers):
        no copy of the state on the way out. Inputs are read in place where the backend can.
        Thread-safe."""
        raise NotImplementedError
