"""Incremental decoding through a torch `step` and `prefill` (TorchScript, torch.export or AOTInductor),
numpy in and out.

The same interface as `gss_runtime.Decoder` over decoder.onnx and prefill.onnx (empty_state / feed /
step, the same choice of graph by length), so one validation (`validation.validate_decoder`) checks
every target's incremental decoding. A state is (pad, past_u, past_k); feeding returns new lists and
leaves the old state usable.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gss_runtime.decoder import PREFILL_ABOVE  # more new tokens than this go through `prefill`, as in the runtime

from .model import GSSConfig


class TorchDecoder:
    """step and prefill: (input_ids, pad, past_u, past_k) -> (logits, new_u, new_k) nested, or flat
    (logits, *new_u, *new_k)."""

    def __init__(self, step: Callable, config: GSSConfig, prefill: Callable | None = None):
        self.step_fn, self.prefill_fn, self.config = step, prefill, config

    def empty_state(self, pads):
        """One zero padding slot (pad counts it): the exported steps need a past of at least one slot."""
        c = self.config
        pad = torch.as_tensor(np.asarray(pads, np.int64)) + 1
        b = len(pad)
        return pad, [torch.zeros(1, b, c.dim_dsconv) for _ in range(c.depth)], [torch.zeros(1, b, c.heads) for _ in range(c.depth)]

    def feed(self, input_ids, state, whole: bool | None = None):
        """input_ids (b, t) -> logits (b, t, num_tokens) numpy, new state; whole: through prefill (True),
        step (False) or by length (None)."""
        pad, past_u, past_k = state
        ids = torch.as_tensor(np.asarray(input_ids, np.int64))
        if whole is None:
            whole = self.prefill_fn is not None and ids.shape[1] > PREFILL_ABOVE
        elif whole and self.prefill_fn is None:
            raise ValueError("this artifact has no prefill")
        with torch.no_grad():
            out = (self.prefill_fn if whole else self.step_fn)(ids, pad, past_u, past_k)
        depth = self.config.depth
        logits, new_u, new_k = out if len(out) == 3 and isinstance(out[1], (list, tuple)) else (out[0], out[1 : 1 + depth], out[1 + depth :])
        grown = [[torch.cat([old, new]) for old, new in zip(past, entries)] for past, entries in ((past_u, new_u), (past_k, new_k))]
        return logits.numpy(), (pad, *grown)

    def step(self, tokens, state):
        """tokens (b,) -> logits (b, num_tokens), new state."""
        logits, state = self.feed(np.asarray(tokens, np.int64).reshape(-1, 1), state)
        return logits[:, 0], state
