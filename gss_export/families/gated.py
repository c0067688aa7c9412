"""What the three upstream models share: the gated layer around a sequence mixer, and the LM around the layers.

Upstream's `GatedDsConv`, `GSS` and `GatedMHESA` are the same block (pseudocode 3.2 of the GSS paper):
LayerNorm, u = GELU(to_u(x)) of width int(dim_expansion_factor * dim), v = GELU(to_v(x)) of the
mixer's width, the mixer along the sequence, then to_out(to_gate(mixed) * u) + x. Only the mixer and
its attribute name (`dsconv`, `dss`, `mhesa`, kept for the checkpoints' keys) differ, so each family
subclasses these two classes and adds its mixer, its config and its step.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import ClassVar

import torch
from torch import nn


class FamilyConfig:
    """What every family's frozen config dataclass shares; a family sets `family`, the class-level facts
    below and its fields.

    The facts are what the rest of the exporter needs from a model it is handed (the upstream class it
    is validated against, the decoder's state and when to prefill), read from `model.config`: only
    intake and the export's top need the table of families (`families.FAMILIES`, whose `Family`
    entries read them from here).
    """

    family: ClassVar[str]  # config.json's model.family
    upstream_class: ClassVar[str]  # the LM class in gated_state_spaces_pytorch
    state: ClassVar[str]  # the decoder's state: "append" (a slot per token) or "replace" (fixed size)
    prefill_above: ClassVar[int] = 128  # a call of more new tokens goes through the prefill graph
    # new tokens decoder.onnx takes per call: None (any, up to prefill_above), or 1 where the family has a
    # one-token step (`step_one`) cheaper than its general step; the runtimes feed more one at a time
    step_tokens: ClassVar[int | None] = None

    def upstream(self):
        """Upstream's eager model of this config (random weights), the reference for validation."""
        import gated_state_spaces_pytorch

        return getattr(gated_state_spaces_pytorch, self.upstream_class)(**self.upstream_kwargs())

    @property
    def dim_hidden(self) -> int:
        return int(self.dim_expansion_factor * self.dim)

    def to_dict(self) -> dict:
        return {"family": self.family, **asdict(self)}

    def upstream_kwargs(self) -> dict:
        """Upstream's constructor arguments: all but `max_seq_len`, which only GatedDsConvLM takes."""
        return {k: v for k, v in asdict(self).items() if k != "max_seq_len" or self.family == "dsconv"}


class GatedLayer(nn.Module):
    """The gate's projections around a mixer; a subclass sets the mixer under upstream's name and
    defines `mix(v)` (the full sequence) and its step."""

    def __init__(self, *, dim: int, width: int, dim_expansion_factor: float, reverse_seq: bool = False):
        super().__init__()
        self.reverse_seq = reverse_seq
        self.norm = nn.LayerNorm(dim)
        dim_hidden = int(dim_expansion_factor * dim)
        self.to_u = nn.Sequential(nn.Linear(dim, dim_hidden, bias=False), nn.GELU())
        self.to_v = nn.Sequential(nn.Linear(dim, width, bias=False), nn.GELU())
        self.to_gate = nn.Linear(width, dim_hidden, bias=False)
        self.to_out = nn.Linear(dim_hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, dim) -> (b, n, dim)"""
        if self.reverse_seq:
            x = torch.flip(x, dims=(1,))
        h = self.norm(x)
        out = self.gated_output(h, self.mix(self.to_v(h)), x)
        if self.reverse_seq:
            out = torch.flip(out, dims=(1,))
        return out

    def gated_output(self, h: torch.Tensor, mixed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The per-position part after the mixer; shared by forward and step. h: the normed input (b, n, dim)."""
        return self.to_out(self.to_gate(mixed) * self.to_u(h)) + residual

    def check_causal(self) -> None:
        if self.reverse_seq:
            raise ValueError("a reverse_seq layer sees the future: it has no incremental form")


class GatedLM(nn.Module):
    """Token embedding, the family's layers, linear head. forward: (b, n) int64 -> (b, n, num_tokens).

    `max_seq_len` bounds the export (upstream's GatedDsConvLM asserts it; the other two have none).
    """

    def __init__(self, config, layers: list[nn.Module], conv: str):
        super().__init__()
        self.config = config
        self.conv_form = conv
        self.max_seq_len = config.max_seq_len
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList(layers)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len {self.max_seq_len}")
        x = self.token_emb(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.to_logits(x)

    def with_conv(self, conv: str):
        """The same weights (shared, not copied) under another convolution form."""
        with torch.device("meta"):  # no random init to throw away
            other = type(self)(self.config, conv=conv)
        other.load_state_dict(self.state_dict(), strict=True, assign=True)
        return other.eval()


def expansion_factor(dim_hidden: int, dim: int) -> float:
    """A dim_expansion_factor with int(factor * dim) == dim_hidden, as upstream computes the width; ValueError if none."""
    factor = dim_hidden / dim
    if int(factor * dim) != dim_hidden:  # the float division can land just below
        factor = math.nextafter(factor, math.inf)
    if int(factor * dim) != dim_hidden:
        raise ValueError(f"hidden width {dim_hidden} cannot be written as int(dim_expansion_factor * dim) with dim={dim}")
    return int(factor) if factor.is_integer() else factor
