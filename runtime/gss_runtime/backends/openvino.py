"""The OpenVINO backend: the same .onnx files on OpenVINO's CPU plugin, at f32 unless bf16 is asked for.

OpenVINO reads gss-export's files as they are (the length switch's If node, dynamic batch and length).
Its CPU plugin computes in bf16 by default wherever the CPU has bf16 arithmetic (AMX, AVX-512 BF16), which
is not exact, so the precision is always set explicitly. The decoder's state goes in as views of its
buffers and comes out written into them (shared-memory tensors), as onnxruntime's IO binding does.

Torch-free: numpy and openvino (`pip install "gss-runtime[openvino]"`).
"""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import RuntimeInputError
from .graph import Graph

try:
    import openvino as ov
except ImportError:  # an optional extra: say how to get it when it is asked for
    ov = None

DEVICE = "CPU"
# OpenVINO's names for the two precisions this runtime offers
HINTS = {"f32": "f32", "bf16": "bf16"}


def require() -> None:
    if ov is None:
        raise RuntimeInputError('the openvino backend needs OpenVINO: pip install "gss-runtime[openvino]" (or pip install openvino)')


@lru_cache(maxsize=1)
def core():
    """One OpenVINO Core per process (it holds the plugins and their caches)."""
    require()
    return ov.Core()


def has_bf16() -> bool:
    """Whether this CPU computes in bf16 (OpenVINO's own reading of it: AMX or AVX-512 BF16)."""
    return "BF16" in core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")


def version() -> str:
    require()
    return ov.__version__.split("-")[0]


class OpenVinoGraph(Graph):
    """A model compiled for OpenVINO's CPU plugin. Each thread gets its own infer requests (one for calls
    that return their outputs, one for calls that write the state into the caller's buffers)."""

    backend = "openvino"

    def __init__(self, path: Path, threads: int | None = None, precision: str = "f32"):
        require()
        if precision not in HINTS:
            raise RuntimeInputError(f"unknown precision {precision!r}; choose one of {', '.join(HINTS)}")
        if precision == "bf16" and not has_bf16():
            raise RuntimeInputError("bf16 was requested but this CPU has no bf16 arithmetic (OpenVINO finds neither AMX nor "
                                    "AVX-512 BF16 here); use precision f32")
        self.path, self.precision = path, precision
        try:
            model = core().read_model(str(path))
        except RuntimeError as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeInputError(f"{path} is not a loadable ONNX model for OpenVINO: {message}") from None
        self._meta = model.get_rt_info(["framework"]).astype(dict) if model.has_rt_info(["framework"]) else {}
        settings = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            settings["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core().compile_model(model, DEVICE, settings)
        dims = lambda port: [d.get_length() if d.is_static else None for d in port.get_partial_shape()]  # noqa: E731
        self.inputs = [(p.get_any_name(), dims(p)) for p in self.compiled.inputs]
        self.outputs = [(p.get_any_name(), dims(p)) for p in self.compiled.outputs]
        self.devices = [f"OpenVINO {DEVICE} {precision}"]
        self._index = {name: i for i, (name, _) in enumerate(self.outputs)}
        self._local = threading.local()

    def meta(self, key):
        value = self._meta.get(key)
        return None if value is None else str(value.astype(str) if hasattr(value, "astype") else value)

    def _request(self, kind: str):
        request = getattr(self._local, kind, None)
        if request is None:
            request = self.compiled.create_infer_request()
            setattr(self._local, kind, request)
        return request

    def run(self, feeds):
        request = self._request("plain")
        request.infer(feeds, share_inputs=True)
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.outputs))]

    def run_into(self, feeds, into):
        request = self._request("into")
        # every state output is bound again on every call: a request keeps the tensors it was last given
        for name, buffer in into.items():
            request.set_output_tensor(self._index[name], ov.Tensor(buffer, shared_memory=True))
        request.infer(feeds, share_inputs=True)
        for name, buffer in into.items():  # the plugin writes into a tensor of the right shape; make sure it did
            if not np.shares_memory(request.get_output_tensor(self._index[name]).data, buffer):
                np.copyto(buffer, request.get_output_tensor(self._index[name]).data)
        return request.get_output_tensor(0).data.copy()
