"""The causal convolution as a DFT written as small matrix products (Monarch / four-step FFT).

Same result as `fft_causal_conv`, but every transform stage is a (batched) matrix product, so an
ONNX graph runs it with onnxruntime's GEMM kernels instead of its slow `DFT` operator (FlashFFTConv
uses the same decomposition on GPUs). The length is

    N = N1 * b * b,  b = min(32, smallest power of two with 2*b^3 >= n),  N1 = 2 * ceil(n / (b*b))

so N >= 2n (a linear, not circular, convolution) and the padding is less than one block of b*b
positions, never up to a power of two. Index digits: input position p = p1*b*b + p2*b + p3
(row-major, so a (n, channels) tensor is already in this order), frequency k = k1 + N1*k2 + N1*b*k3.
Stage 1 contracts p1 (size N1, only the first half non-zero), stage 2 contracts p2 per k1, stage 3
contracts p3 per (k1, k2); twiddle factors are folded into the stage-2 and stage-3 matrices, so the
forward transform is three matrix products and nothing else. Complex numbers are stacked real pairs:
a complex matrix M acts as [[Mr, -Mi], [Mi, Mr]].

The input is real, so its spectrum is Hermitian (X[N - k] = conj X[k]) and so is every stage-1 group:
group N1 - k1 is the conjugate of group k1. Only groups k1 = 0 .. N1/2 are computed (a real-to-complex
stage 1, half the products of a complex one), carried through stages 2 and 3, multiplied, and brought
back; the inverse's stage 1 is complex-to-real (the missing groups enter as twice the real part of
their twins). Nothing is ever transposed: positions stay the outer axis from input to output. Cost per
element is about N1/2 + 4b, smallest near b^3 = N/4, which is where the rule for b puts it.

The inverse of stages 3 and 2 is the conjugate transpose of each: the same matrices transposed.

`ONNX translation`: `onnx_monarch.py` builds the same products with the sizes computed in-graph.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

MAX_BLOCK = 32  # largest b: up to 8192 tokens the rule picks 16 or less; 32 beat 16 at 40,000 and 65,536 tokens


def monarch_sizes(n: int, max_block: int = MAX_BLOCK) -> Tuple[int, int]:
    """(N1, b) for a sequence of n >= 1 positions; the transform length is N1 * b * b >= 2n."""
    b = 1
    while b < max_block and 2 * b * b * b < n:
        b *= 2
    n1 = 2 * ((n + b * b - 1) // (b * b))
    return n1, b


def _w(e: torch.Tensor, length: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """exp(-2 pi i e / length) for integer exponents e, as (real, imag); e is reduced first so the angle is exact."""
    angle = torch.remainder(e, length).to(dtype) * (2.0 * math.pi / length)
    return torch.cos(angle), -torch.sin(angle)


def _stack(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """(..., r, c) complex as real pairs -> (..., 2r, 2c) = [[re, -im], [im, re]], rows and columns (part, index)."""
    return torch.cat([torch.cat([re, -im], -1), torch.cat([im, re], -1)], -2)


def monarch_matrices(n1: int, b: int, device: torch.device, dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
    """The stages for length N = n1*b*b over the groups k1 = 0 .. n1/2 (g = n1/2 + 1 of them), as real matrices.

    m1: (2g, n1/2) real-to-complex stage 1, rows (k1, part), columns p1 < n1/2 (the upper half is zero).
    g2: (g, 2b, 2b) per k1, rows (k2, part), columns (part, p2).
    g3: (g*b, 2b, 2b) per (k1, k2), rows (part, k3), columns (part, p3).
    m1_inverse: (n1/2, 2g) complex-to-real stage 1 with 1/N folded in, rows p1 < n1/2, columns (k1, part).
    """
    length = n1 * b * b
    g = n1 // 2 + 1
    k1 = torch.arange(g, device=device)
    p1 = torch.arange(n1 // 2, device=device)
    fr, fi = _w(k1.unsqueeze(1) * p1.unsqueeze(0) * (b * b), length, dtype)  # (g, n1/2): DFT_N1 rows k1 <= n1/2
    m1 = torch.stack([fr, fi], 1).reshape(2 * g, n1 // 2)
    # y[p1] = (1/N) * sum over all k1 of W^-(p1 k1) D[k1]; the groups past n1/2 are the conjugates of
    # those below, so each inner group counts twice (its real part) and 0 and n1/2 once
    twice = torch.full((g,), 2.0, dtype=dtype, device=device)
    twice[0] = twice[-1] = 1.0
    scale = (twice / length).unsqueeze(0)
    m1_inverse = torch.stack([fr.T * scale, fi.T * scale], 2).reshape(n1 // 2, 2 * g)  # Re(conj(W) D) = Wr Dr + Wi Di
    j = torch.arange(b, device=device)
    # stage 2: W_N^(p2 * b * (k1 + n1*k2)), rows reordered from (part, k2) to (k2, part)
    gr, gi = _w(j.view(1, 1, b) * b * (k1.view(g, 1, 1) + n1 * j.view(1, b, 1)), length, dtype)
    g2 = _stack(gr, gi).reshape(g, 2, b, 2 * b).transpose(1, 2).reshape(g, 2 * b, 2 * b)
    # stage 3: W_N^(p3 * (k1 + n1*k2 + n1*b*k3))
    kk = (k1.view(g, 1) + n1 * j.view(1, b)).reshape(g * b, 1, 1)
    hr, hi = _w(j.view(1, 1, b) * (kk + n1 * b * j.view(1, b, 1)), length, dtype)
    return [m1, g2, _stack(hr, hi), m1_inverse]


def _forward(x: torch.Tensor, mats: List[torch.Tensor], n1: int, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: (batch, n1/2, b*b*C) real, rows p1 -> spectrum (real, imag) of groups k1 <= n1/2, each (batch, g*b, b, C) by k3.

    The last stage runs as two products (real and imaginary rows of g3) so no slice copies the spectrum.
    """
    m1, g2, g3, _ = mats
    batch, channels, g = x.shape[0], x.shape[2] // (b * b), n1 // 2 + 1
    a = torch.matmul(m1, x).reshape(batch, g, 2 * b, b * channels)
    a = torch.matmul(g2, a).reshape(batch, g * b, 2 * b, channels)
    return torch.matmul(g3[:, :b], a), torch.matmul(g3[:, b:], a)


def _inverse(y: torch.Tensor, mats: List[torch.Tensor], n1: int, b: int) -> torch.Tensor:
    """The inverse of `_forward` for a Hermitian spectrum: (batch, g*b, 2b, C) rows (part, k3) -> (batch, n1/2, b*b*C) real."""
    _, g2, g3, m1_inverse = mats
    batch, channels, g = y.shape[0], y.shape[3], n1 // 2 + 1
    a = torch.matmul(g3.transpose(1, 2), y).reshape(batch, g, 2 * b, b * channels)
    a = torch.matmul(g2.transpose(1, 2), a).reshape(batch, 2 * g, b * b * channels)
    return torch.matmul(m1_inverse, a)


def monarch_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """u: (b, n, h, d), K: (b or 1, n, h) -> (b, n, h, d); see the module docstring."""
    batch, n, heads, d = u.shape
    n1, b = monarch_sizes(n)
    half = n1 * b * b // 2
    mats = monarch_matrices(n1, b, u.device, u.dtype)
    x = torch.nn.functional.pad(u.reshape(batch, n, heads * d), [0, 0, 0, half - n])
    sr, si = _forward(x.reshape(batch, n1 // 2, b * b * heads * d), mats, n1, b)
    kb = K.shape[0]  # batch, or 1 for a kernel shared by the batch (the parameter-derived kernels)
    k = torch.nn.functional.pad(K, [0, 0, 0, half - n]).reshape(kb, n1 // 2, b * b * heads)
    kr, ki = _forward(k, mats, n1, b)  # (kb, g*b, b, heads) each
    rows = sr.shape[1]
    shape = [batch, rows, 1, b, heads, d]
    sr, si = sr.reshape(shape), si.reshape(shape)
    kr, ki = kr.reshape(kb, rows, 1, b, heads, 1), ki.reshape(kb, rows, 1, b, heads, 1)
    # [pr; pi] = [kr; ki] * sr + [-ki; kr] * si: both parts in one pass each
    prod = (torch.cat([kr, ki], 2) * sr + torch.cat([-ki, kr], 2) * si).reshape(batch, rows, 2 * b, heads * d)
    out = _inverse(prod, mats, n1, b).reshape(batch, half, heads, d)
    return out[:, :n]
