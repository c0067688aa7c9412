"""GatedExponentialSmoothingLM (multi-head exponential smoothing) equal to gated-state-spaces-pytorch
0.1.0, with a recurrent step whose state has a fixed size.

Per head h, alpha = sigmoid(alphas[h]) and q = (1 - alpha) * sigmoid(dampen_factors[h]); upstream
convolves each head's channels with K[l] = alpha * q^l (its `conv1d_fft` over reversed powers). Here
that kernel goes through the shared convolution forms (one kernel for the whole batch), and the same
layer runs as the exponential moving average it is, for decoding:

    s[h, :] <- q_h * s[h, :] + u[j, h, :]        y[j] = alpha_h * s[h, :] + D * u[j]

A state is (batch, dim_mhesa) per layer. Parameter names are upstream's, so checkpoints load with
strict=True.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..conv.forms import direct_causal_conv, make_conv
from .gated import FamilyConfig, GatedLayer
from .recurrent import RecurrentLM, carried_decay, carried_lags, real_positions


@dataclass(frozen=True)
class ExponentialSmoothingConfig(FamilyConfig):
    """Hyper-parameters of `GatedExponentialSmoothingLM`; all but `max_seq_len` (the export's limit,
    upstream has none) are read from weight shapes."""

    family: ClassVar[str] = "mhesa"
    upstream_class: ClassVar[str] = "GatedExponentialSmoothingLM"
    state: ClassVar[str] = "replace"
    num_tokens: int
    dim: int
    depth: int
    heads: int = 8
    dim_mhesa: int = 512
    dim_expansion_factor: float = 4
    max_seq_len: int = 2048

    def state_shapes(self) -> list[list]:
        return [["batch", self.dim_mhesa]] * self.depth

    def conv_geometry(self) -> tuple[int, int]:
        return self.heads, self.dim_mhesa // self.heads


class MHESA(nn.Module):
    """LayerNorm, then each head's channels smoothed with its own decay, plus u * D; `reverse_seq` flips."""

    def __init__(self, *, dim: int, heads: int, reverse_seq: bool = False, conv: str = "fft"):
        super().__init__()
        assert dim % heads == 0
        self.reverse_seq = reverse_seq
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.alphas = nn.Parameter(torch.randn(heads))
        self.dampen_factors = nn.Parameter(torch.randn(heads))
        self.param_D = nn.Parameter(torch.randn(dim))
        self.conv = make_conv(conv)

    def powers(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha (heads,) and q^l for l = 0 .. count-1 (count, heads)."""
        alpha = self.alphas.sigmoid()
        q = (1 - alpha) * self.dampen_factors.sigmoid()
        lags = torch.arange(count, device=q.device).to(q.dtype).unsqueeze(1)
        powers = torch.pow(q, lags)
        # below 1e-30 they would underflow to subnormal floats, which slow every product they enter
        return alpha, powers * (powers > 1e-30).to(q.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, dim) -> (b, n, dim)"""
        if self.reverse_seq:
            x = torch.flip(x, dims=(1,))
        b, n, dim = x.shape
        u = self.norm(x)
        alpha, Q = self.powers(n)
        out = self.conv(u.reshape(b, n, self.heads, dim // self.heads), (alpha * Q).unsqueeze(0)).reshape(b, n, dim)
        out = out + u * self.param_D
        if self.reverse_seq:
            out = torch.flip(out, dims=(1,))
        return out

    def step(self, x: torch.Tensor, state: torch.Tensor, pad: torch.Tensor, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """t new positions after `state`. x: (b, t, dim); state: (b, dim); pad: (b,) leading padding per row.

        Returns out (b, t, dim) and the state after the last position (b, dim): within the call the
        kernel convolves the new inputs (direct form for a step, the layer's form with `whole=True`),
        the carried state adds alpha * q^lag * s at each position and decays by q per position.
        """
        if self.reverse_seq:
            raise ValueError("a reverse_seq layer sees the future: it has no incremental form")
        b, t, dim = x.shape
        h = self.heads
        u = self.norm(x) * real_positions(pad, t, x.dtype)
        u_heads = u.reshape(b, t, h, dim // h)
        alpha, Q = self.powers(t + 1)
        K = (alpha * Q[:t]).unsqueeze(0)
        mixed = self.conv(u_heads, K) if whole else direct_causal_conv(u_heads, K)
        s = state.reshape(b, h, dim // h)
        carried_out = (alpha * Q[carried_lags(pad, t)]).unsqueeze(-1) * s.unsqueeze(1)  # (b, t, h, d)
        # sum_m q_h^(t-1-m) u[m, h, :] as one product over every (channel, head) pair, then each channel's own
        # head: 8x the multiply-adds of the contraction, but a product, not a reduction along the sequence
        # (which onnxruntime ran 30x slower)
        per_head = torch.matmul(u.transpose(1, 2), Q[:t].flip(0))  # (b, dim, h)
        own = torch.arange(dim, device=x.device).unsqueeze(1) // (dim // h) == torch.arange(h, device=x.device)
        fresh = (per_head * own.to(x.dtype)).sum(-1).reshape(b, h, dim // h)
        new_state = Q[carried_decay(pad, t)].unsqueeze(-1) * s + fresh
        return (mixed + carried_out).reshape(b, t, dim) + u * self.param_D, new_state.reshape(b, dim)


class GatedMHESA(GatedLayer):
    """One gated layer with the MHESA mixer (upstream's takes no reverse_seq; its MHESA does)."""

    def __init__(self, *, dim: int, heads: int = 8, dim_mhesa: int = 512, dim_expansion_factor: float = 4, conv: str = "fft"):
        super().__init__(dim=dim, width=dim_mhesa, dim_expansion_factor=dim_expansion_factor)
        assert dim_mhesa % heads == 0
        self.mhesa = MHESA(dim=dim_mhesa, heads=heads, conv=conv)

    def mix(self, v: torch.Tensor) -> torch.Tensor:
        """v: (b, n, width) -> (b, n, width), the whole sequence"""
        return self.mhesa(v)

    def step(self, x: torch.Tensor, state: torch.Tensor, pad: torch.Tensor, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for t new positions given the state before them (see `MHESA.step`); x: (b, t, dim)."""
        h = self.norm(x)
        mixed, new_state = self.mhesa.step(self.to_v(h), state, pad, whole)
        return self.gated_output(h, mixed, x), new_state


class GatedExponentialSmoothingLM(RecurrentLM):
    """Token embedding, `depth` GatedMHESA layers, linear head. forward: (b, n) int64 -> (b, n, num_tokens)."""

    def __init__(self, config: ExponentialSmoothingConfig, conv: str = "fft"):
        c = config
        layers = [GatedMHESA(dim=c.dim, heads=c.heads, dim_mhesa=c.dim_mhesa, dim_expansion_factor=c.dim_expansion_factor, conv=conv)
                  for _ in range(c.depth)]
        super().__init__(config, layers, conv)

    @torch.jit.export
    def empty_state(self, batch: int) -> list[torch.Tensor]:
        """Zero states, per layer (batch, dim_mhesa); sizes, dtype and device from the weights."""
        state: list[torch.Tensor] = []
        for layer in self.layers:
            d = layer.mhesa.param_D
            state.append(d.new_zeros(batch, d.shape[0]))
        return state
