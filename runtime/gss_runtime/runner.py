"""Run an exported GatedDsConvLM with onnxruntime: input_ids (batch, seq) int64 -> logits (batch, seq, num_tokens).

Torch-free on purpose: numpy and onnxruntime only, so a deployment needs neither torch nor gss_export.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import RuntimeInputError

MODEL_NAME = "model.onnx"
CONFIG_NAME = "config.json"
META_KEY = "gss_export.model"
CONFIG_KEYS = ("num_tokens", "dim", "depth", "heads", "dim_dsconv", "dim_expansion_factor", "max_seq_len")
PROVIDERS = ("auto", "cpu", "cuda")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class GSSRunner:
    """An onnxruntime session over `model.onnx`, with its config and input checks.

    model: a folder written by `gss-export` (model.onnx + config.json) or a .onnx file.
    provider: "auto" (CUDA when it really works, else CPU), "cpu", or "cuda" (CUDA or an error).
    threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    Attributes: `path` (the .onnx file), `config` (dict of CONFIG_KEYS), `providers` (what the session uses).
    """

    def __init__(self, model: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        if provider not in PROVIDERS:
            raise RuntimeInputError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}")
        self.path, config_file = _locate(Path(model))
        self.session = _open_session(self.path, provider, threads)
        self.providers: list[str] = self.session.get_providers()
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != ["input_ids"] or "logits" not in outputs:
            raise RuntimeInputError(
                f"{self.path} is not a GatedDsConvLM export: expected input 'input_ids' and output 'logits', "
                f"found inputs {inputs} and outputs {outputs}"
            )
        self.config: dict = _read_config(self.path, config_file, self.session)
        width = self.session.get_outputs()[outputs.index("logits")].shape[-1]
        if isinstance(width, int) and width != self.config["num_tokens"]:
            raise RuntimeInputError(f"config says num_tokens={self.config['num_tokens']} but {self.path.name} gives {width} logits")

    def logits(self, input_ids) -> np.ndarray:
        """input_ids (seq,) or (batch, seq) ints in [0, num_tokens) -> float32 (batch, seq, num_tokens).

        A 1-D input is one sequence: the result still has a batch axis of 1.
        """
        ids = self._checked(input_ids)
        return self.session.run(["logits"], {"input_ids": ids})[0]

    def next_token_distribution(self, ids, top: int = 5) -> list[tuple[int, float]]:
        """ids (seq,) -> the `top` most likely next tokens as (token_id, probability), most likely first."""
        if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1:
            raise RuntimeInputError(f"top must be a positive integer, got {top!r}")
        batch = self._checked(ids, one_sequence=True)
        last = self.session.run(["logits"], {"input_ids": batch})[0][0, -1].astype(np.float64)
        probs = np.exp(last - last.max())  # shifted by the max: exp cannot overflow
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:top]  # ties: lower id first
        return [(int(i), float(probs[i])) for i in order]

    def _checked(self, input_ids, one_sequence: bool = False) -> np.ndarray:
        """Validate ids against the config; returns contiguous int64 (batch, seq)."""
        try:
            ids = np.asarray(input_ids)
        except ValueError as e:  # ragged nested lists
            raise RuntimeInputError(f"input_ids must be rectangular (every sequence the same length): {e}") from None
        if ids.ndim not in (1, 2):
            raise RuntimeInputError(f"input_ids must be 1-D (seq,) or 2-D (batch, seq), got shape {ids.shape}")
        if one_sequence and ids.ndim != 1:
            raise RuntimeInputError(f"expected one sequence (a 1-D list of token ids), got shape {ids.shape}")
        if ids.size == 0:
            raise RuntimeInputError(f"input_ids is empty (shape {ids.shape}): give at least one token")
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise RuntimeInputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        num_tokens, max_len = self.config["num_tokens"], self.config["max_seq_len"]
        bad = (ids < 0) | (ids >= num_tokens)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            pos = where[0] if ids.ndim == 1 else where
            raise RuntimeInputError(f"token id {ids[where]} at position {pos} is out of range [0, {num_tokens})")
        if ids.shape[-1] > max_len:
            raise RuntimeInputError(f"sequence length {ids.shape[-1]} is too long: this model's max_seq_len is {max_len}")
        return np.ascontiguousarray(np.atleast_2d(ids), dtype=np.int64)


def _locate(model: Path) -> tuple[Path, Path | None]:
    """(the .onnx file, a config.json to read or None)."""
    if not model.exists():
        raise RuntimeInputError(f"model path {model} does not exist; give a folder written by gss-export or a .onnx file")
    if model.is_dir():
        onnx_file = model / MODEL_NAME
        if not onnx_file.is_file():
            found = sorted(p.name for p in model.iterdir())
            listing = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "") or "nothing"
            hint = " (model.pt is a TorchScript export)" if "model.pt" in found else ""
            raise RuntimeInputError(
                f"{model} has no {MODEL_NAME}; it contains {listing}{hint}. "
                f"Expected a folder written by `gss-export --format onnx` (model.onnx + config.json)"
            )
        config = model / CONFIG_NAME
        return onnx_file, config if config.is_file() else None
    # a bare file carries its own config in its metadata; config.json beside it is not assumed to match
    return model, None


def _read_config(path: Path, config_file: Path | None, session: ort.InferenceSession) -> dict:
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
    missing = [k for k in CONFIG_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise RuntimeInputError(f"the model config in {source} lacks {', '.join(missing)}")
    return {k: config[k] for k in CONFIG_KEYS}


def _options(threads: int | None, quiet: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if quiet:
        options.log_severity_level = 3  # errors only: the probe's provider-fallback warnings are expected
    return options


def _session(path: Path, providers: list[str], options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types (InvalidProtobuf, Fail, ...)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeInputError(f"{path} is not a loadable ONNX model: {message}") from None


def _open_session(path: Path, provider: str, threads: int | None) -> ort.InferenceSession:
    if provider == "cpu":
        return _session(path, [CPU], _options(threads))
    if CUDA not in ort.get_available_providers():
        if provider == "cuda":
            raise RuntimeInputError(
                f"CUDA was requested but this onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use provider cpu"
            )
        return _session(path, [CPU], _options(threads))
    # onnxruntime-gpu lists CUDA even without a GPU or CUDA libraries, then silently falls back to CPU:
    # only the created session says what it really uses.
    log, session = _capturing_stderr(lambda: _session(path, [CUDA, CPU], _options(threads, quiet=True)))
    if isinstance(session, ort.InferenceSession) and CUDA in session.get_providers():
        return session
    if provider == "auto":
        return session if isinstance(session, ort.InferenceSession) else _session(path, [CPU], _options(threads))
    if not isinstance(session, ort.InferenceSession):
        _session(path, [CPU], _options(threads))  # raises if the model itself is bad, so CUDA is not blamed
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
