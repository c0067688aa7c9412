"""What the recurrent families (GSS's DSS, MHESA) share: the LM's step and prefill over per-layer
states, and the index helpers for one call of t new tokens per row.

A recurrent layer's state is a weighted sum of every input it has seen, and its contribution to a
new position depends only on how many positions ago the state was last updated: nothing is indexed
by absolute position. A ragged batch is padded on the left of the call, `pad[b]` leading positions
of row b being padding: their inputs are zeroed (they enter neither the outputs nor the state), and
the carried state is read and decayed from the row's first real position, not from the call's.
"""
from __future__ import annotations

import torch

from .gated import GatedLM


def real_positions(pad: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, t, 1): 1 at each row's real positions j >= pad[b], 0 on its leading padding."""
    j = torch.arange(t, device=pad.device)
    return (j.unsqueeze(0) >= pad.unsqueeze(1)).to(dtype).unsqueeze(-1)


def carried_lags(pad: torch.Tensor, t: int) -> torch.Tensor:
    """(b, t) int64: at position j, updates since the carried state, j - pad[b] + 1 (0 on padding, never read)."""
    j = torch.arange(t, device=pad.device)
    return (j.unsqueeze(0) - pad.unsqueeze(1) + 1).clamp(min=0, max=t)


def carried_decay(pad: torch.Tensor, t: int) -> torch.Tensor:
    """(b,) int64: how many updates the carried state goes through in this call, t - pad[b]."""
    return (t - pad).clamp(min=0, max=t)


class RecurrentLM(GatedLM):
    """An LM whose layers carry a fixed-size state: `step` and `prefill` take and return one tensor per layer.

    A family adds `empty_state(batch)`; its layers' `step(x, state, pad, whole)` return (out, new state).
    """

    @torch.jit.export
    def step(self, input_ids: torch.Tensor, pad: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """New tokens after the state; returns logits and a new state, mutates nothing.

        input_ids: (b, t) int64; pad: (b,) int64, each row's leading padding positions in this call
        (a ragged prompt batch is padded on the left; 0 afterwards); state[i]: layer i's state, batch
        first. Returns logits (b, t, num_tokens) and the state after the call. Within the call the
        kernel runs in the direct form, O(t^2): one token, or a few.
        """
        return self._advance(input_ids, pad, state, False)

    @torch.jit.export
    def prefill(self, input_ids: torch.Tensor, pad: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`step` for a prompt: the same results, the convolution in the model's full-sequence form."""
        return self._advance(input_ids, pad, state, True)

    def step_one(self, input_ids: torch.Tensor, pad: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`step` for exactly one new token per row, input_ids (b, 1), through the layers' `step_one`: what
        decoder.onnx runs where the config's `step_tokens` is 1. Not in the TorchScript interface (families
        without it would not compile), whose `step` takes any number of tokens."""
        x = self.token_emb(input_ids)
        new_state: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, s = layer.step_one(x, state[i], pad)
            new_state.append(s)
        return self.to_logits(x), new_state

    def _advance(self, input_ids: torch.Tensor, pad: torch.Tensor, state: list[torch.Tensor], whole: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.token_emb(input_ids)
        new_state: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, s = layer.step(x, state[i], pad, whole)
            new_state.append(s)
        return self.to_logits(x), new_state
