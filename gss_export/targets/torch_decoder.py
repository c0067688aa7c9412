"""Incremental decoding through a torch `step` and `prefill` (TorchScript, torch.export or AOTInductor),
numpy in and out.

The same interface as `gss_runtime.Decoder` over decoder.onnx and prefill.onnx (empty_state / feed /
step, the same choice of graph by length), so one validation (`validation.validate_decoder`) checks
every target's incremental decoding. A state is a value: feeding returns a new one and leaves the old
one usable. For an appended state (GatedDsConvLM) it is (pad, past_u, past_k), the past growing by the
returned entries (u head-major, (b, heads, slots, d)); for a recurrent one (pending pad, per-layer states), replaced whole at each call.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .decoder_io import state_kind


class TorchDecoder:
    """step and prefill: (input_ids, pad, *state) -> (logits, *state update) nested, or flat."""

    def __init__(self, step: Callable, config, prefill: Callable | None = None, step_max: int | None = None):
        """step_max: the most new tokens `step` takes in one call (ExecuTorch's bound); longer feeds that must go
        through it are fed in pieces."""
        self.step_fn, self.prefill_fn, self.config, self.step_max = step, prefill, config, step_max
        self.kind = state_kind(config)
        self.prefill_above = config.prefill_above  # as the runtime reads it from the export

    def empty_state(self, pads):
        """Appended: one zero padding slot (pad counts it), the exported steps need a past of at least one
        slot. Recurrent: zero states, the pads waiting for the first call."""
        c = self.config
        pad = torch.as_tensor(np.asarray(pads, np.int64))
        b = len(pad)
        if self.kind == "append":
            u = [torch.zeros(b, c.heads, 1, c.dim_dsconv // c.heads) for _ in range(c.depth)]
            return pad + 1, u, [torch.zeros(1, b, c.heads) for _ in range(c.depth)]
        return pad, [torch.zeros(b, *s[1:]) for s in c.state_shapes()]

    def feed(self, input_ids, state, whole: bool | None = None):
        """input_ids (b, t) -> logits (b, t, num_tokens) numpy, new state; whole: through prefill (True),
        step (False) or by length (None)."""
        ids = torch.as_tensor(np.asarray(input_ids, np.int64))
        if whole is None:
            whole = self.prefill_fn is not None and ids.shape[1] > self.prefill_above
        elif whole and self.prefill_fn is None:
            raise ValueError("this artifact has no prefill")
        if not whole and self.step_max is not None and ids.shape[1] > self.step_max:
            pieces = []
            for start in range(0, ids.shape[1], self.step_max):
                logits, state = self.feed(ids[:, start : start + self.step_max], state, whole=False)
                pieces.append(logits)
            return np.concatenate(pieces, axis=1), state
        pad, *tensors = state
        call_pad = pad if self.kind == "append" else pad.clamp(max=ids.shape[1])
        with torch.no_grad():
            out = (self.prefill_fn if whole else self.step_fn)(ids, call_pad, *tensors)
        depth = self.config.depth
        nested = isinstance(out[1], (list, tuple))
        logits = out[0]
        if self.kind == "append":
            new_u, new_k = (out[1], out[2]) if nested else (out[1 : 1 + depth], out[1 + depth :])
            # u head-major: (t, b, heads * d) entries become (b, heads, t, d) slots; the past is exactly its slots here (no room)
            b, h = ids.shape[0], self.config.heads
            u = [torch.cat([old, new.reshape(new.shape[0], b, h, -1).permute(1, 2, 0, 3)], 2) for old, new in zip(tensors[0], new_u)]
            k = [torch.cat([old, new]) for old, new in zip(tensors[1], new_k)]
            return logits.numpy(), (pad, u, k)
        new_state = list(out[1]) if nested else list(out[1:])
        return logits.numpy(), (pad - call_pad, new_state)

    def step(self, tokens, state):
        """tokens (b,) -> logits (b, num_tokens), new state."""
        logits, state = self.feed(np.asarray(tokens, np.int64).reshape(-1, 1), state)
        return logits[:, 0], state
