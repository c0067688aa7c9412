"""GatedDsConvLM equal to gated-state-spaces-pytorch 0.1.0, with a swappable convolution form and a step
whose state grows by one slot per token.

Parameter names match upstream exactly (`token_emb`, `layers.{i}.to_u.0`, `layers.{i}.dsconv.param_D`,
...), so an upstream state dict loads with `strict=True`. No einops: TorchScript can script this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..conv.forms import causal_conv_step, continuation_inputs, make_conv
from .gated import FamilyConfig, GatedLayer, GatedLM


@dataclass(frozen=True)
class DsConvConfig(FamilyConfig):
    """Hyper-parameters of `GatedDsConvLM`; all but `max_seq_len` are readable from weight shapes."""

    family: ClassVar[str] = "dsconv"
    upstream_class: ClassVar[str] = "GatedDsConvLM"
    state: ClassVar[str] = "append"
    num_tokens: int
    dim: int
    depth: int
    heads: int = 8
    dim_dsconv: int = 512
    dim_expansion_factor: float = 4
    max_seq_len: int = 2048

    def conv_geometry(self) -> tuple[int, int]:
        """(heads, head_dim) of the convolution."""
        return self.heads, self.dim_dsconv // self.heads


class EfficientDsConv(nn.Module):
    """LayerNorm, data-dependent kernel K = to_weight(x), causal conv per head, plus u * D."""

    def __init__(self, *, dim: int, heads: int, conv: str = "fft"):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_weight = nn.Linear(dim, heads, bias=False)
        self.param_D = nn.Parameter(torch.randn(dim))
        self.conv = make_conv(conv)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (b, n, dim) -> conv inputs u (b, n, dim) and kernel values K (b, n, heads).

        Both depend on their own position only: the kernel value at lag t comes from position t.
        """
        return self.norm(x), self.to_weight(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, dim) -> (b, n, dim)"""
        b, n, dim = x.shape
        u, K = self.project(x)
        out = self.conv(u.reshape(b, n, self.heads, dim // self.heads), K)
        return out.reshape(b, n, dim) + u * self.param_D

    def step(
        self, x: torch.Tensor, u_past: torch.Tensor, k_past: torch.Tensor, pad: torch.Tensor, whole: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New positions given the conv inputs and kernel values seen so far.

        x: (b, t, dim) for slots C..C+t-1; u_past: (b, heads, capacity, dim / heads), head-major, its
        slots 0..C-1 filled (the rest is room, finite, never read); k_past: (C, b, heads); pad: (b,).
        Returns out (b, t, dim) and the new entries only, u_new (t, b, dim) and k_new (t, b, heads):
        the caller appends them, nothing is mutated or copied here. `whole=False` reads the past
        directly (`causal_conv_step`, O(t * (C + t)): one token, or a few); `whole=True` runs this
        layer's full-sequence form over all C + t slots (a prompt: the cost of a forward of C + t).
        """
        b, t, dim = x.shape
        u, K = self.project(x)
        h = self.heads
        u_heads, C = u.reshape(b, t, h, dim // h), k_past.shape[0]
        if whole:
            # the filled slots by a gather: a slice or narrow lets torch.export assume capacity != context
            filled = u_past.index_select(2, torch.arange(C, device=u_past.device))
            u_all, k_all = continuation_inputs(filled.permute(2, 0, 1, 3), k_past, u_heads, K, pad)
            out = self.conv(u_all, k_all)[:, C:]
        else:
            out = causal_conv_step(u_past, k_past, u_heads, K, pad)
        return out.reshape(b, t, dim) + u * self.param_D, u.transpose(0, 1), K.transpose(0, 1)


class GatedDsConv(GatedLayer):
    """One gated layer with the dsconv mixer; `reverse_seq` runs it over the flipped sequence."""

    def __init__(
        self,
        *,
        dim: int,
        heads: int = 8,
        dim_dsconv: int = 512,
        dim_expansion_factor: float = 4,
        reverse_seq: bool = False,
        conv: str = "fft",
    ):
        super().__init__(dim=dim, width=dim_dsconv, dim_expansion_factor=dim_expansion_factor, reverse_seq=reverse_seq)
        assert dim_dsconv % heads == 0
        self.dsconv = EfficientDsConv(dim=dim_dsconv, heads=heads, conv=conv)

    def mix(self, v: torch.Tensor) -> torch.Tensor:
        """v: (b, n, width) -> (b, n, width), the whole sequence"""
        return self.dsconv(v)

    def step(
        self, x: torch.Tensor, u_past: torch.Tensor, k_past: torch.Tensor, pad: torch.Tensor, whole: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` for new positions only (see `EfficientDsConv.step`); x: (b, t, dim)."""
        self.check_causal()
        h = self.norm(x)
        conv, u_new, k_new = self.dsconv.step(self.to_v(h), u_past, k_past, pad, whole)
        return self.gated_output(h, conv, x), u_new, k_new


class GatedDsConvLM(GatedLM):
    """Token embedding, `depth` GatedDsConv layers, linear head. forward: (b, n) int64 -> (b, n, num_tokens)."""

    def __init__(self, config: DsConvConfig, conv: str = "fft"):
        c = config
        layers = [GatedDsConv(dim=c.dim, heads=c.heads, dim_dsconv=c.dim_dsconv, dim_expansion_factor=c.dim_expansion_factor, conv=conv)
                  for _ in range(c.depth)]
        super().__init__(config, layers, conv)

    @torch.jit.export  # scripted beside forward: C++ (runtime/cpp) decodes incrementally with it
    def step(
        self, input_ids: torch.Tensor, pad: torch.Tensor, past_u: list[torch.Tensor], past_k: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Decode new tokens given what the layers saw before them; returns the new entries, mutates nothing.

        input_ids: (b, t) int64 for slots C..C+t-1; pad: (b,) int64, the slot of each row's position 0
        (a ragged prompt batch is padded on the left of the storage, absolute positions stay right);
        past_u[i]: (b, heads, capacity, dim_dsconv / heads) normalised conv inputs of layer i, head-major,
        slots 0..C-1 filled and the rest room for the tokens to come (finite, never read into a result);
        past_k[i]: (C, b, heads) its kernel values (C may be 0). Returns logits (b, t, num_tokens) and,
        per layer, the new entries u (t, b, dim_dsconv) and k (t, b, heads) for slots C..C+t-1. The
        convolution reads the past directly, once: O(t * (capacity + t)), right for one token or a few.
        """
        return self._advance(input_ids, pad, past_u, past_k, False)

    @torch.jit.export
    def prefill(
        self, input_ids: torch.Tensor, pad: torch.Tensor, past_u: list[torch.Tensor], past_k: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """`step` for a prompt or a long continuation: the same inputs, outputs and results, with each
        layer's convolution run by its full-sequence form over all C + t slots (the cost of a forward
        of C + t tokens, where `step` costs O(t * (C + t)))."""
        return self._advance(input_ids, pad, past_u, past_k, True)

    def _advance(
        self, input_ids: torch.Tensor, pad: torch.Tensor, past_u: list[torch.Tensor], past_k: list[torch.Tensor], whole: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        x = self.token_emb(input_ids)
        new_u: list[torch.Tensor] = []
        new_k: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, u, k = layer.step(x, past_u[i], past_k[i], pad, whole)
            new_u.append(u)
            new_k.append(k)
        return self.to_logits(x), new_u, new_k

    @torch.jit.export
    def empty_state(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The state before any token: per layer, u (batch, heads, 0, dim_dsconv / heads) and k (0, batch, heads).

        Sizes, dtype and device come from the weights (to_weight: (heads, dim_dsconv)), so the scripted
        module answers this without the Python config.
        """
        past_u: list[torch.Tensor] = []
        past_k: list[torch.Tensor] = []
        for layer in self.layers:
            w = layer.dsconv.to_weight.weight
            past_u.append(w.new_zeros(batch, w.shape[0], 0, w.shape[1] // w.shape[0]))
            past_k.append(w.new_zeros(0, batch, w.shape[0]))
        return past_u, past_k
