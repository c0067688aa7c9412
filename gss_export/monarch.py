"""The causal convolution as a DFT written as small matrix products (Monarch / four-step FFT).

Same result as `fft_causal_conv`, but every transform stage is a (batched) matrix product, so an
ONNX graph runs it with onnxruntime's GEMM kernels instead of its slow `DFT` operator (FlashFFTConv
uses the same decomposition on GPUs). The length is

    N = N1 * b * b,  b = min(16, smallest power of two with 2*b^3 >= n),  N1 = 2 * ceil(n / (b*b))

so N >= 2n (a linear, not circular, convolution) and the padding is less than one block of b*b
positions, never up to a power of two. Stage cost per element is about 2*N1 + 8*b, smallest near
N1 = 4b, which is where the rule for b puts it. Index digits: input position p = p1*b*b + p2*b + p3 (row-major), frequency
k = k1 + N1*k2 + N1*b*k3. Stage 1 contracts p1 (size N1, only the first half is non-zero),
stage 2 contracts p2 per k1, stage 3 contracts p3 per (k1, k2); twiddle factors are folded into
the stage-2 and stage-3 matrices, so the forward transform is three matrix products and nothing
else. Complex numbers are stacked real pairs: a complex matrix M acts as [[Mr, -Mi], [Mi, Mr]].

Two real channels of a head share its kernel, so they travel as one complex channel
(z = u[..., :d/2] + i u[..., d/2:]; conv(z, K) = conv(zr, K) + i conv(zi, K) for a real K), which
halves the work. The inverse is the conjugate transpose of each stage in reverse order: the same
matrices transposed.

`ONNX translation`: `onnx_monarch.py` builds the same products with the sizes computed in-graph.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

MAX_BLOCK = 16  # largest b: at 4096 tokens 16 beat 32 (fewer flops in small products) when measured


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
    """The three forward stages for length N = n1*b*b, as stacked real matrices.

    m1: (2*n1, n1) rows (k1, part), columns (part, p1 < n1/2): the input's upper half is zero.
    g2: (n1, 2b, 2b) per k1, rows (k2, part), columns (part, p2).
    g3: (n1*b, 2b, 2b) per (k1, k2), rows (part, k3), columns (part, p3).
    """
    length = n1 * b * b
    k1 = torch.arange(n1, device=device)
    p1 = torch.arange(n1 // 2, device=device)
    fr, fi = _w(k1.unsqueeze(1) * p1.unsqueeze(0) * (b * b), length, dtype)  # (n1, n1/2) = DFT_N1
    m1 = torch.stack([torch.cat([fr, -fi], 1), torch.cat([fi, fr], 1)], 1).reshape(2 * n1, n1)
    j = torch.arange(b, device=device)
    # stage 2: W_N^(p2 * b * (k1 + n1*k2)), rows reordered from (part, k2) to (k2, part)
    gr, gi = _w(j.view(1, 1, b) * b * (k1.view(n1, 1, 1) + n1 * j.view(1, b, 1)), length, dtype)
    g2 = _stack(gr, gi).reshape(n1, 2, b, 2 * b).transpose(1, 2).reshape(n1, 2 * b, 2 * b)
    # stage 3: W_N^(p3 * (k1 + n1*k2 + n1*b*k3))
    kk = (k1.view(n1, 1) + n1 * j.view(1, b)).reshape(n1 * b, 1, 1)
    hr, hi = _w(j.view(1, 1, b) * (kk + n1 * b * j.view(1, b, 1)), length, dtype)
    return [m1, g2, _stack(hr, hi)]


def _forward(z: torch.Tensor, mats: List[torch.Tensor], n1: int, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """z: (batch, 2 * n1/2, b*b*C) rows (part, p1) -> spectrum (real, imag), each (batch, n1*b, b, C) by k3.

    The last stage runs as two products (real and imaginary rows of g3) so no slice copies the spectrum.
    """
    m1, g2, g3 = mats
    batch, channels = z.shape[0], z.shape[2] // (b * b)
    a = torch.matmul(m1, z).reshape(batch, n1, 2 * b, b * channels)
    a = torch.matmul(g2, a).reshape(batch, n1 * b, 2 * b, channels)
    return torch.matmul(g3[:, :b], a), torch.matmul(g3[:, b:], a)


def _inverse(y: torch.Tensor, mats: List[torch.Tensor], n1: int, b: int, scale: float) -> torch.Tensor:
    """`scale` times the conjugate transpose of `_forward`: (batch, n1*b, 2b, C) -> (batch, 2 * n1/2, b*b*C).

    The scale (1/N for the inverse DFT) rides on the small last matrix instead of a pass over the result.
    """
    m1, g2, g3 = mats
    batch, channels = y.shape[0], y.shape[3]
    a = torch.matmul(g3.transpose(1, 2), y).reshape(batch, n1, 2 * b, b * channels)
    a = torch.matmul(g2.transpose(1, 2), a).reshape(batch, 2 * n1, b * b * channels)
    return torch.matmul(m1.transpose(0, 1) * scale, a)


def monarch_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """u: (b, n, h, d), K: (b, n, h) -> (b, n, h, d); see the module docstring."""
    batch, n, heads, d = u.shape
    odd = d % 2
    if odd:  # a zero channel makes the pairs; dropped at the end
        u = torch.cat([u, torch.zeros_like(u[..., :1])], -1)
    half_d = (d + odd) // 2
    n1, b = monarch_sizes(n)
    length = n1 * b * b
    half = length // 2
    mats = monarch_matrices(n1, b, u.device, u.dtype)
    # (batch, part, half, heads, d/2): the two halves of each head as real and imaginary parts
    z = u.reshape(batch, n, heads, 2, half_d).permute(0, 3, 1, 2, 4)
    z = torch.nn.functional.pad(z, [0, 0, 0, 0, 0, half - n]).reshape(batch, 2 * half, heads * half_d)
    sr, si = _forward(z.reshape(batch, n1, b * b * heads * half_d), mats, n1, b)
    k = torch.nn.functional.pad(K, [0, 0, 0, half - n]).reshape(batch, n1 // 2, b * b * heads)
    kr, ki = _forward(torch.cat([k, torch.zeros_like(k)], 1), mats, n1, b)  # (batch, n1*b, b, heads) each
    shape = [batch, n1 * b, 1, b, heads, half_d]
    sr, si = sr.reshape(shape), si.reshape(shape)
    kr, ki = kr.reshape(batch, n1 * b, 1, b, heads, 1), ki.reshape(batch, n1 * b, 1, b, heads, 1)
    # [pr; pi] = [kr; ki] * sr + [-ki; kr] * si: both parts in one pass each (three, where seven were)
    prod = (torch.cat([kr, ki], 2) * sr + torch.cat([-ki, kr], 2) * si).reshape(batch, n1 * b, 2 * b, heads * half_d)
    out = _inverse(prod, mats, n1, b, 1.0 / length)  # (batch, 2 * n1/2, b*b*C) rows (part, p1)
    out = out.reshape(batch, 2, half, heads, half_d)[:, :, :n].permute(0, 2, 3, 1, 4).reshape(batch, n, heads, 2 * half_d)
    return out[..., :d] if odd else out
