"""GatedDsConvLM equal to gated-state-spaces-pytorch 0.1.0, with a swappable convolution form.

Parameter names match upstream exactly (`token_emb`, `layers.{i}.to_u.0`, `layers.{i}.dsconv.param_D`,
...), so an upstream state dict loads with `strict=True`. No einops: TorchScript can script this.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .conv_forms import causal_conv_at, make_conv


def _write_at(past: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """past (b, C, f) grown by t slots, new (b, t, f) written at positions (b, t): a new tensor."""
    grown = torch.cat([past, torch.zeros_like(new)], dim=1)
    return grown.scatter(1, positions.unsqueeze(-1).expand(-1, -1, new.shape[2]), new)


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
        self, x: torch.Tensor, u_past: torch.Tensor, k_past: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New positions given the conv inputs and kernel values seen so far; returns new state.

        x: (b, t, dim) at absolute positions `positions` (b, t); u_past: (b, C, dim); k_past: (b, C, heads).
        Returns out (b, t, dim), u_state (b, C + t, dim), k_state (b, C + t, heads) with the new
        entries written at their positions (a row behind the others overwrites what its padding left).
        """
        b, t, dim = x.shape
        u, K = self.project(x)
        u_state = _write_at(u_past, u, positions)
        k_state = _write_at(k_past, K, positions)
        heads = self.heads
        out = causal_conv_at(u_state.reshape(b, -1, heads, dim // heads), k_state, positions)
        return out.reshape(b, t, dim) + u * self.param_D, u_state, k_state


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
        out = self.gated_output(h, self.dsconv(self.to_v(h)), x)
        if self.reverse_seq:
            out = torch.flip(out, dims=(1,))
        return out

    def step(
        self, x: torch.Tensor, u_past: torch.Tensor, k_past: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` for new positions only (see `EfficientDsConv.step`); x: (b, t, dim)."""
        if self.reverse_seq:
            raise ValueError("a reverse_seq layer sees the future: it has no incremental form")
        h = self.norm(x)
        conv, u_state, k_state = self.dsconv.step(self.to_v(h), u_past, k_past, positions)
        return self.gated_output(h, conv, x), u_state, k_state

    def gated_output(self, h: torch.Tensor, conv: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The per-position part after the convolution; shared by forward and step."""
        return self.to_out(self.to_gate(conv) * self.to_u(h)) + residual


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

    def step(
        self, input_ids: torch.Tensor, positions: torch.Tensor, conv_u: torch.Tensor, conv_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode new tokens given the state of the tokens before them; returns new state, mutates nothing.

        input_ids: (b, t) int64; positions: (b,) int64, the absolute position of each row's first new
        token (how many of its tokens the state holds); conv_u: (depth, b, C, dim_dsconv) normalised
        conv inputs; conv_k: (depth, b, C, heads) kernel values. An empty state has C = 0.
        Returns logits (b, t, num_tokens), conv_u (depth, b, C + t, dim_dsconv), conv_k (depth, b, C + t, heads).
        """
        t = input_ids.shape[1]
        pos = positions.unsqueeze(1) + torch.arange(t, device=input_ids.device)  # (b, t)
        x = self.token_emb(input_ids)
        us, ks = [], []
        for i, layer in enumerate(self.layers):
            x, u, k = layer.step(x, conv_u[i], conv_k[i], pos)
            us.append(u)
            ks.append(k)
        return self.to_logits(x), torch.stack(us), torch.stack(ks)

    def empty_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The state before any token: conv_u (depth, batch, 0, dim_dsconv), conv_k (depth, batch, 0, heads)."""
        c = self.config
        return torch.zeros(c.depth, batch, 0, c.dim_dsconv), torch.zeros(c.depth, batch, 0, c.heads)

    def with_conv(self, conv: str) -> "GatedDsConvLM":
        """The same weights (shared, not copied) under another convolution form."""
        with torch.device("meta"):  # no random init to throw away
            other = GatedDsConvLM(self.config, conv=conv)
        other.load_state_dict(self.state_dict(), strict=True, assign=True)
        return other.eval()
