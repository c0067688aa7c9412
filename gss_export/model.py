"""GatedDsConvLM equal to gated-state-spaces-pytorch 0.1.0, with a swappable convolution form.

Parameter names match upstream exactly (`token_emb`, `layers.{i}.to_u.0`, `layers.{i}.dsconv.param_D`,
...), so an upstream state dict loads with `strict=True`. No einops: TorchScript can script this.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .conv_forms import make_conv


@dataclass(frozen=True)
class GSSConfig:
    """Hyper-parameters of `GatedDsConvLM`; all but `max_seq_len` are readable from weight shapes."""

    num_tokens: int
    dim: int
    depth: int
    heads: int = 8
    dim_dsconv: int = 512
    dim_expansion_factor: float = 4
    max_seq_len: int = 2048

    @property
    def dim_hidden(self) -> int:
        return int(self.dim_expansion_factor * self.dim)

    def to_dict(self) -> dict:
        return asdict(self)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, dim) -> (b, n, dim)"""
        b, n, dim = x.shape
        u = self.norm(x)
        K = self.to_weight(x)  # (b, n, heads): kernel value at lag t comes from position t
        out = self.conv(u.reshape(b, n, self.heads, dim // self.heads), K)
        return out.reshape(b, n, dim) + u * self.param_D


class GatedDsConv(nn.Module):
    """One gated layer (upstream pseudocode 3.2); `reverse_seq` runs it over the flipped sequence."""

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
        super().__init__()
        assert dim_dsconv % heads == 0
        self.reverse_seq = reverse_seq
        self.norm = nn.LayerNorm(dim)
        dim_hidden = int(dim_expansion_factor * dim)
        self.to_u = nn.Sequential(nn.Linear(dim, dim_hidden, bias=False), nn.GELU())
        self.to_v = nn.Sequential(nn.Linear(dim, dim_dsconv, bias=False), nn.GELU())
        self.dsconv = EfficientDsConv(dim=dim_dsconv, heads=heads, conv=conv)
        self.to_gate = nn.Linear(dim_dsconv, dim_hidden, bias=False)
        self.to_out = nn.Linear(dim_hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, dim) -> (b, n, dim)"""
        if self.reverse_seq:
            x = torch.flip(x, dims=(1,))
        h = self.norm(x)
        out = self.to_out(self.to_gate(self.dsconv(self.to_v(h))) * self.to_u(h)) + x
        if self.reverse_seq:
            out = torch.flip(out, dims=(1,))
        return out


class GatedDsConvLM(nn.Module):
    """Token embedding, `depth` GatedDsConv layers, linear head. forward: (b, n) int64 -> (b, n, num_tokens)."""

    def __init__(self, config: GSSConfig, conv: str = "fft"):
        super().__init__()
        self.config = config
        self.conv_form = conv
        self.max_seq_len = config.max_seq_len
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList(
            GatedDsConv(
                dim=config.dim,
                heads=config.heads,
                dim_dsconv=config.dim_dsconv,
                dim_expansion_factor=config.dim_expansion_factor,
                conv=conv,
            )
            for _ in range(config.depth)
        )
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.max_seq_len:  # upstream asserts the same
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len {self.max_seq_len}")
        x = self.token_emb(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.to_logits(x)

    def with_conv(self, conv: str) -> "GatedDsConvLM":
        """The same weights (shared, not copied) under another convolution form."""
        other = GatedDsConvLM(self.config, conv=conv)
        other.load_state_dict(self.state_dict(), strict=True, assign=True)
        return other.eval()
