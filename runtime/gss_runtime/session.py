"""Opening an exported model: locating its files, reading its config, opening a graph on a backend.

Torch-free: the backends (`backends/`) bring their engines.
"""
from __future__ import annotations

import json
from pathlib import Path

from .backends import (BACKENDS, PRECISIONS, PROVIDERS, SPIN_ALWAYS, SPIN_IN_CALL, SPIN_NEVER, Graph, check_backend,
                       open_graph)
from .errors import RuntimeInputError

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


def read_config(path: Path, config_file: Path | None, graph: Graph) -> dict:
    if config_file is not None:
        source = str(config_file)
        try:
            config = json.loads(config_file.read_text()).get("model")
        except (OSError, ValueError, AttributeError) as e:
            raise RuntimeInputError(f"cannot read {config_file}: {e}") from None
    else:
        source = f"the metadata of {path}"
        raw = graph.meta(META_KEY)
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


def check_precision(backend: str, precision: str, config_file: Path | None) -> None:
    """bf16 only where the export's own quality check measured it and it passed (config.json's
    `backends.openvino.bf16`, written by `gss-export --openvino`); otherwise a message that says why."""
    if backend != "openvino" or precision == "f32":
        return
    record = None
    if config_file is not None:
        try:
            record = ((json.loads(config_file.read_text()).get("backends") or {}).get("openvino") or {}).get("bf16")
        except (OSError, ValueError, AttributeError):
            record = None
    if not isinstance(record, dict):
        raise RuntimeInputError(
            "bf16 has not been checked for this export, so how far it strays from float32 is unknown: re-export with "
            "`gss-export CKPT --output DIR --openvino` (it measures top-1 agreement and KL on held-out text), or use precision f32"
        )
    if not record.get("ok"):
        why = "; ".join(record.get("failures") or []) or "it did not pass"
        raise RuntimeInputError(f"bf16 failed this export's quality check ({why}); use precision f32")


def open_model_graph(path: Path, config_file: Path | None, backend: str = "onnxruntime", provider: str = "auto",
                     threads: int | None = None, spin: str = SPIN_ALWAYS, precision: str = "f32",
                     measuring: bool = False) -> Graph:
    """`path` on `backend` after every check of the request (backend, provider, precision, and bf16's quality
    record unless `measuring` it)."""
    check_backend(backend, provider, threads, precision)
    if not measuring:
        check_precision(backend, precision, config_file)
    return open_graph(path, backend, provider, threads, spin, precision)


def open_session(path: Path, provider: str, threads: int | None, spin: str = SPIN_ALWAYS):
    """An onnxruntime session on `provider` (backends.onnxruntime.open_session)."""
    from .backends.onnxruntime import open_session as ort_session

    return ort_session(path, provider, threads, spin)


__all__ = ["BACKENDS", "PRECISIONS", "PROVIDERS", "SPIN_ALWAYS", "SPIN_IN_CALL", "SPIN_NEVER", "check_precision", "locate",
           "open_model_graph", "open_session", "read_config"]
