"""GatedStateSpacesLM (GSS with a DSS kernel) equal to gated-state-spaces-pytorch 0.1.0, with a
recurrent step whose state has a fixed size.

Upstream builds, at every call, Lambda = -exp(Lambda_real) + i * exp(Lambda_imag) (no exp on the
imaginary part with dss_kernel_lambda_imag_exp=False), C' = (C_real + i C_imag) * (exp(Lambda) - 1) / Lambda
and the kernel K[l, h] = Re(sum_n C'[h, n] * exp(Lambda_n * l)), then convolves each channel with it.
Here the kernel goes through the shared convolution forms (one kernel for the whole batch), and the
same layer is run as the exact linear recurrence it is, for decoding:

    s[h, n] <- exp(Lambda_n) * s[h, n] + u[j, h]        y[j, h] = Re(sum_n C'[h, n] s[h, n]) + D[h] u[j, h]

A state is (batch, N/g, H, 2, g) per layer: N / g blocks of g modes (g = `mode_block(N)`, 8 where it
divides N), each block an (H, 2g) matrix whose rows are one channel's g real parts, then their g
imaginary parts. That order lets a one-token step advance a whole block of modes with one matrix
product, s' = s @ M with M the block's 2g x 2g rotation and decay, and write its result as the new
state with no copy; the halves order, (batch, H, 2N), needed four products, two sums, a split and a
concat over the state. Runtimes never look inside a state: they read its shape from the export.
Complex numbers are real pairs throughout, so every target (ONNX has no complex type) runs the same
code. Parameter names are upstream's, so checkpoints load with strict=True.
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
class StateSpacesConfig(FamilyConfig):
    """Hyper-parameters of `GatedStateSpacesLM`. All but `dss_kernel_lambda_imag_exp` (shapes cannot
    tell it) and `max_seq_len` (the export's limit; upstream has none) are read from weight shapes."""

    family: ClassVar[str] = "gss"
    upstream_class: ClassVar[str] = "GatedStateSpacesLM"
    state: ClassVar[str] = "replace"
    # decoder.onnx runs `step_one` (one token, a few passes over the state); two tokens or more go to
    # prefill.onnx, whose monarch form beat the general step's direct form from 16 tokens anyway
    prefill_above: ClassVar[int] = 1
    step_tokens: ClassVar[int | None] = 1
    num_tokens: int
    dim: int
    depth: int
    dss_kernel_N: int = 512
    dss_kernel_H: int = 256
    dim_expansion_factor: float = 4
    dss_kernel_lambda_imag_exp: bool = True
    max_seq_len: int = 2048

    def state_shapes(self) -> list[list]:
        """Per layer: the state's shape, batch symbolic."""
        g = mode_block(self.dss_kernel_N)
        return [["batch", self.dss_kernel_N // g, self.dss_kernel_H, 2, g]] * self.depth

    def conv_geometry(self) -> tuple[int, int]:
        """(heads, head_dim) of the convolution: one kernel per channel."""
        return self.dss_kernel_H, 1


def mode_block(modes: int) -> int:
    """Modes per block of the state's storage: 8 where it divides N (the fastest measured), else 4, 2 or 1."""
    for g in [8, 4, 2]:  # a loop, not next(...): TorchScript compiles this
        if modes % g == 0:
            return g
    return 1


def to_blocks(halves: torch.Tensor) -> torch.Tensor:
    """(b, H, 2N), N real parts then N imaginary parts per channel -> the stored state (b, N/g, H, 2, g):
    one transpose, whose result is the state itself (no copy after it)."""
    b, H, N = halves.shape[0], halves.shape[1], halves.shape[2] // 2
    g = mode_block(N)
    return halves.reshape(b, H, 2, N // g, g).permute(0, 3, 1, 2, 4).contiguous()


def from_blocks(state: torch.Tensor) -> torch.Tensor:
    """The stored state (b, N/g, H, 2, g) -> (b, H, 2N), real parts then imaginary parts: one transpose."""
    b, blocks, H, g = state.shape[0], state.shape[1], state.shape[2], state.shape[4]
    return state.permute(0, 2, 3, 1, 4).reshape(b, H, 2 * blocks * g)


def complex_product(ar: torch.Tensor, ai: torch.Tensor, br: torch.Tensor, bi: torch.Tensor) -> torch.Tensor:
    """(ar + i ai) * (br + i bi), broadcast, as its real parts then its imaginary parts along the last axis."""
    return torch.cat([ar * br - ai * bi, ar * bi + ai * br], -1)


class DSS(nn.Module):
    """LayerNorm, then each of the H channels convolved with its DSS kernel, plus u * D."""

    def __init__(self, *, dim: int, kernel_N: int = 512, dss_kernel_lambda_imag_exp: bool = True, conv: str = "fft"):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.Lambda_real = nn.Parameter(torch.randn(kernel_N))
        self.Lambda_imag = nn.Parameter(torch.randn(kernel_N))
        self.C_real = nn.Parameter(torch.randn(dim, kernel_N))
        self.C_imag = nn.Parameter(torch.randn(dim, kernel_N))
        self.param_D = nn.Parameter(torch.randn(dim))
        self.dss_kernel_lambda_imag_exp = dss_kernel_lambda_imag_exp
        self.conv = make_conv(conv)

    def _rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lambda = -decay + i * freq, each (N,)."""
        freq = self.Lambda_imag.exp() if self.dss_kernel_lambda_imag_exp else self.Lambda_imag
        return self.Lambda_real.exp(), freq

    def powers(self, count: int) -> torch.Tensor:
        """exp(Lambda * l) for l = 0 .. count-1: (count, 2N), real parts then imaginary parts.

        As exp(Lambda * B q) * exp(Lambda * r) with l = B q + r: transcendentals for N * (count / B + B)
        values, gathered by q and r (a gather, not a slice of a padded table, keeps torch.export's
        length symbolic).
        """
        block = 64
        decay, freq = self._rates()
        lags = torch.arange(count, device=decay.device)
        q = torch.div(lags, block, rounding_mode="floor")
        # one block more than needed: a table of one row would let torch.export specialise the length
        coarse = (torch.arange(count // block + 2, device=decay.device) * block).to(decay.dtype).unsqueeze(1)
        fine = torch.arange(block, device=decay.device).to(decay.dtype).unsqueeze(1)
        cm, fm = torch.exp(-decay * coarse), torch.exp(-decay * fine)
        cr, ci = (cm * torch.cos(freq * coarse))[q], (cm * torch.sin(freq * coarse))[q]  # (count, N)
        r = lags - q * block
        fr, fi = (fm * torch.cos(freq * fine))[r], (fm * torch.sin(freq * fine))[r]
        # powers below 1e-30 become 0: left in, they underflow to subnormal floats, which make every
        # matrix product they enter many times slower (measured 1.5 against 220 GFLOP/s) for no accuracy
        live = ((cm[q] * fm[r]) > 1e-30).to(decay.dtype).repeat(1, 2)
        return complex_product(cr, ci, fr, fi) * live

    def readout(self) -> torch.Tensor:
        """C' = C * (exp(Lambda) - 1) / Lambda: (H, 2N), real parts then imaginary parts."""
        decay, freq = self._rates()
        m = torch.exp(-decay)
        zr, zi = m * torch.cos(freq) - 1, m * torch.sin(freq)  # exp(Lambda) - 1
        norm2 = decay * decay + freq * freq  # z / Lambda = z * conj(Lambda) / |Lambda|^2, Lambda = -decay + i freq
        qr, qi = (-zr * decay + zi * freq) / norm2, (-zi * decay - zr * freq) / norm2
        return complex_product(self.C_real, self.C_imag, qr, qi)

    @staticmethod
    def kernel(powers: torch.Tensor, readout: torch.Tensor, n: int) -> torch.Tensor:
        """K[l, h] = Re(sum_n C'[h, n] exp(Lambda_n l)) for l < n: (n, H), one matrix product."""
        modes = readout.shape[1] // 2
        return torch.matmul(powers[:n], torch.cat([readout[:, :modes], -readout[:, modes:]], -1).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, H) -> (b, n, H)"""
        n = x.shape[1]
        u = self.norm(x)
        K = self.kernel(self.powers(n), self.readout(), n)
        return self.conv(u.unsqueeze(-1), K.unsqueeze(0)).squeeze(-1) + u * self.param_D

    def step(self, x: torch.Tensor, state: torch.Tensor, pad: torch.Tensor, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """t new positions after `state`. x: (b, t, H); state: (b, N/g, H, 2, g); pad: (b,) leading padding per row.

        Returns out (b, t, H) and the state after the last position (b, N/g, H, 2, g). Within the call the
        kernel convolves the new inputs (direct form for a step, the layer's form for a prompt,
        `whole=True`); the carried state adds Re(C' exp(Lambda)^lag s) at each position and is decayed
        past the call. The cost is per token, whatever came before.
        """
        b, t, _ = x.shape
        u = self.norm(x) * real_positions(pad, t, x.dtype)
        P = self.powers(t + 1)
        Ct = self.readout()
        K = self.kernel(P, Ct, t).unsqueeze(0)
        mixed = (self.conv(u.unsqueeze(-1), K) if whole else direct_causal_conv(u.unsqueeze(-1), K)).squeeze(-1)
        modes = P.shape[1] // 2
        halves = from_blocks(state)
        sr, si = halves[..., :modes], halves[..., modes:]
        cr, ci = Ct[:, :modes], Ct[:, modes:]
        z = complex_product(cr, ci, sr, si)  # C' * s, halves: (b, H, 2N)
        # Re(E z) with E = exp(Lambda * lag): [Er | -Ei] @ [zr | zi]^T, the sign on the small table, not the state
        conj = torch.cat([P[:, :modes], -P[:, modes:]], -1)
        carried_out = torch.matmul(conj[carried_lags(pad, t)], z.transpose(1, 2))  # (b, t, H)
        d = P[carried_decay(pad, t)].unsqueeze(1)  # (b, 1, 2N)
        dr, di = d[..., :modes], d[..., modes:]
        carried = complex_product(dr, di, sr, si)
        fresh = torch.matmul(u.transpose(1, 2), P[:t].flip(0))  # sum_m exp(Lambda (t-1-m)) u[m]: (b, H, 2N)
        return mixed + carried_out + u * self.param_D, to_blocks(carried + fresh)

    def step_one(self, x: torch.Tensor, state: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` for exactly one new position: x (b, 1, H), state (b, N/g, H, 2, g), pad (b,) 0 or 1 -> (b, 1, H), (b, N/g, H, 2, g).

        The recurrence itself, s' = exp(Lambda) s + u and y = Re(sum_n C'_n s'_n) + D u (the kernel's
        first tap, Re(sum C') u, is the u inside s'), on the stored blocks: per row and block of g modes
        one (H, 2g) @ (2g, 2g) product with M = [[diag(Er), diag(Ei)], [-diag(Ei), diag(Er)]], E =
        exp(Lambda) (the identity on a padding position, pad 1, which leaves the state as it is), then
        u added to the real parts and the readout. Three passes over the state where the halves took
        about six and the general `step` thirteen: what a batched step costs.
        """
        b, H = x.shape[0], x.shape[2]
        u = self.norm(x) * real_positions(pad, 1, x.dtype)  # (b, 1, H)
        d = self.powers(2)[carried_decay(pad, 1)]  # exp(Lambda), or 1 on padding: (b, 2N)
        N = d.shape[-1] // 2
        g = mode_block(N)
        eye = torch.eye(g, dtype=x.dtype, device=x.device)
        dr, di = eye * d[:, :N].reshape(b, N // g, 1, g), eye * d[:, N:].reshape(b, N // g, 1, g)  # diagonal (b, N/g, g, g)
        M = torch.cat([torch.cat([dr, di], -1), torch.cat([-di, dr], -1)], -2)  # (b, N/g, 2g, 2g)
        real_part = torch.cat([torch.ones(g, dtype=x.dtype, device=x.device), torch.zeros(g, dtype=x.dtype, device=x.device)])
        turned = torch.matmul(state.reshape(b, N // g, H, 2 * g), M).reshape(b, N // g, H, 2, g)
        new = turned + u.reshape(b, 1, H, 1, 1) * real_part.reshape(2, g)  # written as the new state, no copy
        c = self.readout()  # Re(C' s') = sum Cr sr - Ci si: the signed readout in the state's block order
        signed = to_blocks(torch.cat([c[:, :N], -c[:, N:]], -1).unsqueeze(0))[0]  # (N/g, H, 2, g)
        y = (new * signed).sum(1).reshape(b, H, 2 * g).sum(-1)  # (b, H): the blocks first, onnxruntime's faster order
        return y.unsqueeze(1) + u * self.param_D, new


class GSS(GatedLayer):
    """One gated layer with the DSS mixer; `reverse_seq` runs it over the flipped sequence."""

    def __init__(
        self,
        *,
        dim: int,
        dim_expansion_factor: float = 4,
        dss_kernel_N: int = 512,
        dss_kernel_H: int = 256,
        reverse_seq: bool = False,
        dss_kernel_lambda_imag_exp: bool = True,
        conv: str = "fft",
    ):
        super().__init__(dim=dim, width=dss_kernel_H, dim_expansion_factor=dim_expansion_factor, reverse_seq=reverse_seq)
        self.dss = DSS(dim=dss_kernel_H, kernel_N=dss_kernel_N, dss_kernel_lambda_imag_exp=dss_kernel_lambda_imag_exp, conv=conv)

    def mix(self, v: torch.Tensor) -> torch.Tensor:
        """v: (b, n, width) -> (b, n, width), the whole sequence"""
        return self.dss(v)

    def step(self, x: torch.Tensor, state: torch.Tensor, pad: torch.Tensor, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for t new positions given the state before them (see `DSS.step`); x: (b, t, dim)."""
        self.check_causal()
        h = self.norm(x)
        mixed, new_state = self.dss.step(self.to_v(h), state, pad, whole)
        return self.gated_output(h, mixed, x), new_state

    def step_one(self, x: torch.Tensor, state: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` for one new position (see `DSS.step_one`); x: (b, 1, dim)."""
        self.check_causal()
        h = self.norm(x)
        mixed, new_state = self.dss.step_one(self.to_v(h), state, pad)
        return self.gated_output(h, mixed, x), new_state


class GatedStateSpacesLM(RecurrentLM):
    """Token embedding, `depth` GSS layers, linear head. forward: (b, n) int64 -> (b, n, num_tokens)."""

    def __init__(self, config: StateSpacesConfig, conv: str = "fft"):
        c = config
        layers = [
            GSS(dim=c.dim, dim_expansion_factor=c.dim_expansion_factor, dss_kernel_N=c.dss_kernel_N, dss_kernel_H=c.dss_kernel_H,
                dss_kernel_lambda_imag_exp=c.dss_kernel_lambda_imag_exp, conv=conv)
            for _ in range(c.depth)
        ]
        super().__init__(config, layers, conv)

    @torch.jit.export
    def empty_state(self, batch: int) -> list[torch.Tensor]:
        """Zero states, per layer (batch, N/g, H, 2, g); sizes, dtype and device from the weights (C_real: (H, N))."""
        state: list[torch.Tensor] = []
        for layer in self.layers:
            c = layer.dss.C_real
            g = mode_block(c.shape[1])
            state.append(c.new_zeros(batch, c.shape[1] // g, c.shape[0], 2, g))
        return state
