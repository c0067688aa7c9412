"""Where the exported graphs run: one small module per inference engine, behind one interface (`Graph`).

- `onnxruntime` (the default, always installed): provider `auto` (CUDA when it really works, else the
  CPU), `cpu` or `cuda`; float32.
- `openvino` (`pip install "gss-runtime[openvino]"`): OpenVINO's CPU plugin, at `f32`, or `bf16`
  where the CPU has bf16 arithmetic and the export's bf16 quality check passed (see `session.py`).

The same `model.onnx`, `decoder.onnx` and `prefill.onnx` run unchanged on both.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import RuntimeInputError
from .graph import SPIN_ALWAYS, SPIN_IN_CALL, SPIN_NEVER, Graph

BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")
PROVIDERS = ("auto", "cpu", "cuda")


def check_backend(backend: str, provider: str, threads: int | None, precision: str = "f32") -> None:
    """Fails with a one-line message on a combination no backend offers."""
    if backend not in BACKENDS:
        raise RuntimeInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if provider not in PROVIDERS:
        raise RuntimeInputError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if precision not in PRECISIONS:
        raise RuntimeInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}")
    if backend == "onnxruntime" and precision != "f32":
        raise RuntimeInputError(f"precision {precision} is OpenVINO's (backend openvino); onnxruntime runs these exports in f32")
    if backend == "openvino" and provider == "cuda":
        raise RuntimeInputError("the openvino backend runs on the CPU; provider cuda is onnxruntime's (backend onnxruntime)")


def open_graph(path: Path, backend: str = "onnxruntime", provider: str = "auto", threads: int | None = None,
               spin: str = SPIN_ALWAYS, precision: str = "f32") -> Graph:
    """`path` opened on `backend` (arguments checked by check_backend first)."""
    if backend == "openvino":
        from .openvino import OpenVinoGraph

        return OpenVinoGraph(path, threads, precision)
    from .onnxruntime import OrtGraph

    return OrtGraph(path, provider, threads, spin)


__all__ = ["BACKENDS", "PRECISIONS", "PROVIDERS", "SPIN_ALWAYS", "SPIN_IN_CALL", "SPIN_NEVER", "Graph", "check_backend", "open_graph"]
