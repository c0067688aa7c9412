"""The onnxruntime backend (the default): CPU or CUDA execution provider, IO binding for the state.

Torch-free: numpy and onnxruntime only.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from ..errors import RuntimeInputError
from ..int8_cpu import guard
from .graph import SPIN_ALWAYS, SPIN_IN_CALL, SPIN_NEVER, Graph

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class OrtGraph(Graph):
    """An onnxruntime InferenceSession behind the Graph interface (`session` is public for profiling)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, provider: str = "auto", threads: int | None = None, spin: str = SPIN_ALWAYS):
        self.path = path
        self.session = open_session(path, provider, threads, spin)
        self.devices = self.session.get_providers()
        dims = lambda shape: [d if isinstance(d, int) else None for d in shape]  # noqa: E731 (symbolic names -> None)
        self.inputs = [(i.name, dims(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [(o.name, dims(o.shape)) for o in self.session.get_outputs()]
        self._meta = self.session.get_modelmeta().custom_metadata_map

    def meta(self, key):
        return self._meta.get(key)

    def run(self, feeds):
        return self.session.run(None, feeds)

    def run_into(self, feeds, into):
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        first = self.outputs[0][0]
        binding.bind_output(first)
        for name, buffer in into.items():
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buffer))
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


def _options(threads: int | None, quiet: bool = False, spin: str = SPIN_ALWAYS) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if spin == SPIN_NEVER:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spin == SPIN_IN_CALL:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    if quiet:
        options.log_severity_level = 3  # errors only: the probe's provider-fallback warnings are expected
    return guard(options)  # int8 exports ranged for VNNI stay exact on CPUs without it


def _session(path: Path, providers: list[str], options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types (InvalidProtobuf, Fail, ...)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeInputError(f"{path} is not a loadable ONNX model: {message}") from None


def open_session(path: Path, provider: str, threads: int | None, spin: str = SPIN_ALWAYS) -> ort.InferenceSession:
    """An onnxruntime session on `provider`. spin: SPIN_NEVER for a graph called now and then (a prompt)
    beside one called back to back (the steps), whose threads would otherwise compete with the
    spinning ones on a small machine; SPIN_IN_CALL where other work shares the cores between calls."""
    if provider == "cpu":
        return _session(path, [CPU], _options(threads, spin=spin))
    if CUDA not in ort.get_available_providers():
        if provider == "cuda":
            raise RuntimeInputError(
                f"CUDA was requested but this onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use provider cpu"
            )
        return _session(path, [CPU], _options(threads, spin=spin))
    # onnxruntime-gpu lists CUDA even without a GPU or CUDA libraries, then silently falls back to CPU:
    # only the created session says what it really uses.
    log, session = _capturing_stderr(lambda: _session(path, [CUDA, CPU], _options(threads, quiet=True, spin=spin)))
    if isinstance(session, ort.InferenceSession) and CUDA in session.get_providers():
        return session
    if provider == "auto":
        return session if isinstance(session, ort.InferenceSession) else _session(path, [CPU], _options(threads, spin=spin))
    if not isinstance(session, ort.InferenceSession):
        _session(path, [CPU], _options(threads, spin=spin))  # raises if the model itself is bad, so CUDA is not blamed
        log = f"{log}\n{session}"
    raise RuntimeInputError(
        f"CUDA was requested but onnxruntime cannot use it: {_cuda_reason(log)}; "
        f"use provider cpu or auto, or install the CUDA libraries onnxruntime-gpu {ort.__version__} needs"
    )


def _capturing_stderr(make):
    """(text written to fd 2, make() or the exception it raised): onnxruntime's C++ logger bypasses sys.stderr."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (e.g. some embedded interpreters): nothing to capture
        saved = None
    with tempfile.TemporaryFile() as sink:
        if saved is not None:
            os.dup2(sink.fileno(), 2)
        try:
            result = make()
        except Exception as e:
            result = e
        finally:
            sys.stderr.flush()
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
        sink.seek(0)
        return sink.read().decode(errors="replace"), result


def _cuda_reason(log: str) -> str:
    """The useful part of onnxruntime's CUDA-provider failure log, e.g. the missing library and required versions."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log)
    parts = []
    missing = re.search(r"with error: ([^\n]+)", text)
    if missing:
        parts.append(missing.group(1).strip())
    needs = re.search(r"Require ([^\n]+?)\. Please", text)
    if needs:
        parts.append(f"it requires {needs.group(1)}")
    if not parts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        parts.append(lines[-1][-300:] if lines else "the session fell back to CPU (no GPU, or CUDA/cuDNN libraries missing)")
    return "; ".join(parts)
