"""Run an exported gated-state-spaces LM (any of the three families): input_ids (batch, seq) int64 -> logits (batch, seq, num_tokens).

Torch-free on purpose: numpy and a backend (onnxruntime, or OpenVINO), so a deployment needs neither torch nor gss_export.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import RuntimeInputError
from .session import locate, open_model_graph, read_config


class GSSRunner:
    """`model.onnx` opened on a backend, with its config and input checks.

    model: a folder written by `gss-export` (model.onnx + config.json) or a .onnx file.
    provider: onnxruntime's "auto" (CUDA when it really works, else CPU), "cpu", or "cuda" (CUDA or an error).
    threads: the backend's intra-op threads (default: its own choice).
    backend: "onnxruntime" (default) or "openvino"; precision: "f32", or "bf16" (OpenVINO, where checked).
    Attributes: `path` (the .onnx file), `config` (dict of CONFIG_KEYS), `graph` (backends.Graph),
    `providers` (what runs it).
    """

    def __init__(self, model: str | os.PathLike, provider: str = "auto", threads: int | None = None,
                 backend: str = "onnxruntime", precision: str = "f32"):
        self.path, config_file = locate(Path(model))
        self.graph = open_model_graph(self.path, config_file, backend, provider, threads, precision=precision)
        self.providers: list[str] = self.graph.devices
        inputs, outputs = self.graph.input_names, self.graph.output_names
        if inputs != ["input_ids"] or "logits" not in outputs:
            raise RuntimeInputError(
                f"{self.path} is not a gss-export model: expected input 'input_ids' and output 'logits', "
                f"found inputs {inputs} and outputs {outputs}"
            )
        self.config: dict = read_config(self.path, config_file, self.graph)
        width = self.graph.outputs[outputs.index("logits")][1][-1]
        if isinstance(width, int) and width != self.config["num_tokens"]:
            raise RuntimeInputError(f"config says num_tokens={self.config['num_tokens']} but {self.path.name} gives {width} logits")

    def logits(self, input_ids) -> np.ndarray:
        """input_ids (seq,) or (batch, seq) ints in [0, num_tokens) -> float32 (batch, seq, num_tokens).

        A 1-D input is one sequence: the result still has a batch axis of 1.
        """
        ids = self._checked(input_ids)
        return self.graph.run({"input_ids": ids})[0]

    def next_token_distribution(self, ids, top: int = 5) -> list[tuple[int, float]]:
        """ids (seq,) -> the `top` most likely next tokens as (token_id, probability), most likely first."""
        if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1:
            raise RuntimeInputError(f"top must be a positive integer, got {top!r}")
        batch = self._checked(ids, one_sequence=True)
        last = self.graph.run({"input_ids": batch})[0][0, -1].astype(np.float64)
        probs = np.exp(last - last.max())  # shifted by the max: exp cannot overflow
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:top]  # ties: lower id first
        return [(int(i), float(probs[i])) for i in order]

    def _checked(self, input_ids, one_sequence: bool = False) -> np.ndarray:
        return check_ids(input_ids, self.config, one_sequence)


def check_ids(input_ids, config: dict, one_sequence: bool = False) -> np.ndarray:
    """Validate token ids against a model config; returns contiguous int64 (batch, seq)."""
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
    num_tokens, max_len = config["num_tokens"], config["max_seq_len"]
    bad = (ids < 0) | (ids >= num_tokens)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        pos = where[0] if ids.ndim == 1 else where
        raise RuntimeInputError(f"token id {ids[where]} at position {pos} is out of range [0, {num_tokens})")
    if ids.shape[-1] > max_len:
        raise RuntimeInputError(f"sequence length {ids.shape[-1]} is too long: this model's max_seq_len is {max_len}")
    return np.ascontiguousarray(np.atleast_2d(ids), dtype=np.int64)


