"""Opening an exported model with onnxruntime: locating files, reading the config, choosing providers.

Torch-free: numpy and onnxruntime only.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from .errors import RuntimeInputError
from .int8_cpu import guard

MODEL_NAME = "model.onnx"
CONFIG_NAME = "config.json"
META_KEY = "gss_export.model"
# what every family's config has; `family` is absent from exports made before there were three (dsconv)
CONFIG_KEYS = ("num_tokens", "dim", "depth", "dim_expansion_factor", "max_seq_len")
FAMILY_KEYS = {
    "dsconv": ("heads", "dim_dsconv"),
    "gss": ("dss_kernel_N", "dss_kernel_H", "dss_kernel_lambda_imag_exp"),
    "mhesa": ("heads", "dim_mhesa"),
}
PROVIDERS = ("auto", "cpu", "cuda")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def check_provider(provider: str, threads: int | None) -> None:
    if provider not in PROVIDERS:
        raise RuntimeInputError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}")


def locate(model: Path, name: str = MODEL_NAME) -> tuple[Path, Path | None]:
    """(the .onnx file, a config.json to read or None)."""
    if not model.exists():
        raise RuntimeInputError(f"model path {model} does not exist; give a folder written by gss-export or a .onnx file")
    if model.is_dir():
        onnx_file = model / name
        if not onnx_file.is_file():
            found = sorted(p.name for p in model.iterdir())
            listing = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "") or "nothing"
            hint = " (model.pt is a TorchScript export)" if "model.pt" in found else ""
            if name != MODEL_NAME and MODEL_NAME in found:
                hint = f" (exported with --no-decoder? re-export without it to get {name})"
            raise RuntimeInputError(
                f"{model} has no {name}; it contains {listing}{hint}. "
                f"Expected a folder written by `gss-export --format onnx` (model.onnx, decoder.onnx, config.json)"
            )
        config = model / CONFIG_NAME
        return onnx_file, config if config.is_file() else None
    # a bare file carries its own config in its metadata; config.json beside it is not assumed to match
    return model, None


def read_config(path: Path, config_file: Path | None, session: ort.InferenceSession) -> dict:
    if config_file is not None:
        source = str(config_file)
        try:
            config = json.loads(config_file.read_text()).get("model")
        except (OSError, ValueError, AttributeError) as e:
            raise RuntimeInputError(f"cannot read {config_file}: {e}") from None
    else:
        source = f"the metadata of {path}"
        raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise RuntimeInputError(
                f"{path} has no {META_KEY} metadata and no {CONFIG_NAME} beside it; export it with gss-export"
            )
        try:
            config = json.loads(raw)
        except ValueError as e:
            raise RuntimeInputError(f"{META_KEY} in {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise RuntimeInputError(f"the model config in {source} is not a JSON object")
    family = config.get("family", "dsconv")
    if family not in FAMILY_KEYS:
        raise RuntimeInputError(f"the model config in {source} names family {family!r}; this runtime knows {', '.join(FAMILY_KEYS)}")
    keys = CONFIG_KEYS + FAMILY_KEYS[family]
    missing = [k for k in keys if k not in config]
    if missing:
        raise RuntimeInputError(f"the model config in {source} lacks {', '.join(missing)}")
    return {"family": family, **{k: config[k] for k in keys}}


# how a session's idle threads wait: spinning between calls too (onnxruntime's default), spinning
# between the operators of a call only (they stop when it returns), or never
SPIN_ALWAYS, SPIN_IN_CALL, SPIN_NEVER = "always", "in_call", "never"


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
