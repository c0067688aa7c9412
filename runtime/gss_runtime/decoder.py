"""The decoder with state (`decoder.onnx`) driven from numpy: prefill ragged prompts, then step.

Torch-free. The state holds, per layer, the normalised conv inputs and kernel values of every
position so far; a row's entries live at their absolute positions. Ragged prompts are padded on
the right (never the left: the kernel is indexed by absolute position); what padding leaves past
a row's length is never read and is overwritten as the row advances.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import RuntimeInputError
from .runner import check_ids
from .session import check_provider, locate, open_session, read_config

DECODER_NAME = "decoder.onnx"
INPUTS = ["input_ids", "positions", "conv_u", "conv_k"]
OUTPUTS = ["logits", "conv_u_out", "conv_k_out"]


@dataclass(frozen=True)
class DecoderState:
    """conv_u (depth, b, C, dim_dsconv), conv_k (depth, b, C, heads) float32; lengths (b,) int64 tokens held per row."""

    conv_u: np.ndarray
    conv_k: np.ndarray
    lengths: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.conv_u.nbytes + self.conv_k.nbytes

    def rows(self, keep: np.ndarray) -> "DecoderState":
        """The state of the rows `keep` (indices) only."""
        return DecoderState(self.conv_u[:, keep], self.conv_k[:, keep], self.lengths[keep])


class Decoder:
    """An onnxruntime session over `decoder.onnx`. model: a gss-export folder or the decoder .onnx file."""

    def __init__(self, model: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        check_provider(provider, threads)
        path = Path(model)
        self.path, config_file = locate(path, DECODER_NAME) if path.is_dir() else locate(path)
        self.session = open_session(self.path, provider, threads)
        self.providers: list[str] = self.session.get_providers()
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (INPUTS, OUTPUTS):
            raise RuntimeInputError(
                f"{self.path} is not a gss-export decoder with state: expected inputs {INPUTS} and outputs {OUTPUTS}, "
                f"found {names[0]} and {names[1]} (re-export with gss-export --format onnx)"
            )
        self.config: dict = read_config(self.path, config_file, self.session)

    def empty_state(self, batch: int) -> DecoderState:
        c = self.config
        return DecoderState(
            np.zeros((c["depth"], batch, 0, c["dim_dsconv"]), np.float32),
            np.zeros((c["depth"], batch, 0, c["heads"]), np.float32),
            np.zeros(batch, np.int64),
        )

    def feed(self, input_ids: np.ndarray, state: DecoderState) -> tuple[np.ndarray, DecoderState]:
        """input_ids (b, t) at positions lengths..lengths+t-1 -> logits (b, t, num_tokens), new state."""
        ids = check_ids(input_ids, self.config)
        if int(state.lengths.max(initial=0)) + ids.shape[1] > self.config["max_seq_len"]:
            raise RuntimeInputError(f"the sequence would exceed max_seq_len {self.config['max_seq_len']}")
        logits, conv_u, conv_k = self.session.run(
            OUTPUTS, {"input_ids": ids, "positions": state.lengths, "conv_u": state.conv_u, "conv_k": state.conv_k}
        )
        return logits, DecoderState(conv_u, conv_k, state.lengths + ids.shape[1])

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, DecoderState]:
        """Prompts of any lengths -> logits after each prompt's last token (b, num_tokens), and the state."""
        if len(prompts) == 0:
            raise RuntimeInputError("no prompts given")
        rows = [check_ids(p, self.config, one_sequence=True)[0] for p in prompts]
        lengths = np.array([len(r) for r in rows], np.int64)
        padded = np.zeros((len(rows), int(lengths.max())), np.int64)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
        logits, state = self.feed(padded, self.empty_state(len(rows)))
        return logits[np.arange(len(rows)), lengths - 1], DecoderState(state.conv_u, state.conv_k, lengths)

    def step(self, tokens: np.ndarray, state: DecoderState) -> tuple[np.ndarray, DecoderState]:
        """One new token per row (b,) -> logits (b, num_tokens) for the token after it, and the state."""
        logits, state = self.feed(np.asarray(tokens, np.int64).reshape(-1, 1), state)
        return logits[:, 0], state
