"""ONNX translation of `gss_export::monarch_causal_conv`: the DFT as matrix products, sizes in-graph.

Mirrors `monarch.py` step for step: the block size b and the transform length N = N1*b*b are
computed from the sequence length with integer ops, the stage matrices from Range/Cos/Sin, so one
file serves every length. No Transpose touches the data: positions stay the outer axis throughout. Everything heavy is MatMul; only Gather-free elementwise ops remain,
which every onnxruntime provider implements (no DFT, which the CUDA provider lacks).
"""
from __future__ import annotations

import math

from onnxscript import FLOAT, INT32

from .monarch import MAX_BLOCK
from .onnx_fft import _OPSETS

_BLOCKS = [1 << i for i in range(MAX_BLOCK.bit_length())]  # candidate b: the powers of two up to MAX_BLOCK


def monarch_conv_translation(opset: int, head_dim: int, heads: int):
    """The translation for the custom op at `opset`; head_dim and heads are the model's (static)."""
    if opset not in _OPSETS:
        raise ValueError(f"the monarch form is written for opsets 17-23; got {opset}")
    op = _OPSETS[opset]
    channels = heads * head_dim

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def scalar(x):
        return op.Squeeze(x, ints(0))

    def cat(*parts, axis=0):
        return op.Concat(*parts, axis=axis)

    def pad_rows(x, amount):
        """x (B, n, ...) with `amount` zero rows appended along axis 1. Concat, not Pad: Pad changed in
        opset 18 and has no adapter back to 17."""
        return cat(x, op.ConstantOfShape(cat(op.Shape(x, start=0, end=1), amount, op.Shape(x, start=2))), axis=1)

    def stack(re, im):
        """(..., r, c) complex -> (..., 2r, 2c) = [[re, -im], [im, re]]"""
        return cat(cat(re, op.Neg(im), axis=-1), cat(im, re, axis=-1), axis=-2)

    def monarch_causal_conv(u, K):
        """u: (B, n, h, d) float, K: (B or 1, n, h) float -> (B, n, h, d)"""
        batch = op.Shape(u, start=0, end=1)
        n = op.Shape(u, start=1, end=2)
        # b = the first candidate with 2*b^3 >= n, else the largest (ArgMax returns the first maximum)
        fits = op.Or(op.GreaterOrEqual(ints(*[2 * c**3 for c in _BLOCKS]), n), op.Equal(ints(*_BLOCKS), ints(_BLOCKS[-1])))
        b = op.Gather(ints(*_BLOCKS), op.ArgMax(op.Cast(fits, to=INT32.dtype), axis=0, keepdims=1))
        bb = op.Mul(b, b)
        n1 = op.Mul(ints(2), op.Div(op.Sub(op.Add(n, bb), ints(1)), bb))
        length = op.Mul(n1, bb)
        half_n1 = op.Div(n1, ints(2))
        half = op.Mul(half_n1, bb)
        groups = op.Add(half_n1, ints(1))  # k1 = 0 .. n1/2: the others are their conjugates
        step = op.Div(op.Constant(value_float=2.0 * math.pi), op.Cast(scalar(length), to=FLOAT.dtype))

        def w(e):
            angle = op.Mul(op.Cast(op.Mod(e, scalar(length)), to=FLOAT.dtype), step)
            return op.Cos(angle), op.Neg(op.Sin(angle))

        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        k1 = op.Range(zero, scalar(groups), one)
        p1 = op.Range(zero, scalar(half_n1), one)
        j = op.Range(zero, scalar(b), one)
        fr, fi = w(op.Mul(op.Mul(op.Unsqueeze(k1, ints(1)), op.Unsqueeze(p1, ints(0))), bb))  # (g, n1/2)
        m1 = op.Reshape(cat(op.Unsqueeze(fr, ints(1)), op.Unsqueeze(fi, ints(1)), axis=1), cat(op.Mul(groups, ints(2)), half_n1))
        # complex-to-real stage 1: groups 0 and n1/2 count once, the others twice (their conjugates), 1/N folded in
        last = op.Sub(groups, ints(1))
        inner = op.And(op.Greater(k1, zero), op.Less(k1, scalar(last)))
        weight = op.Div(op.Add(op.Cast(inner, to=FLOAT.dtype), op.Constant(value_float=1.0)), op.Cast(scalar(length), to=FLOAT.dtype))
        m1_inverse = op.Reshape(
            cat(op.Unsqueeze(op.Mul(op.Transpose(fr, perm=[1, 0]), weight), ints(2)),
                op.Unsqueeze(op.Mul(op.Transpose(fi, perm=[1, 0]), weight), ints(2)), axis=2),
            cat(half_n1, op.Mul(groups, ints(2))),
        )
        two_b = op.Mul(b, ints(2))
        k1_col = op.Reshape(k1, ints(-1, 1, 1))
        j_mid, j_last = op.Reshape(j, ints(1, -1, 1)), op.Reshape(j, ints(1, 1, -1))
        gr, gi = w(op.Mul(op.Mul(j_last, b), op.Add(k1_col, op.Mul(n1, j_mid))))
        g2 = op.Reshape(
            op.Transpose(op.Reshape(stack(gr, gi), cat(groups, ints(2), b, two_b)), perm=[0, 2, 1, 3]),
            cat(groups, two_b, two_b),
        )
        kk = op.Reshape(op.Add(op.Reshape(k1, ints(-1, 1)), op.Mul(n1, op.Reshape(j, ints(1, -1)))), ints(-1, 1, 1))
        hr, hi = w(op.Mul(j_last, op.Add(kk, op.Mul(op.Mul(n1, b), j_mid))))
        g3 = stack(hr, hi)
        g3_re, g3_im = op.Slice(g3, ints(0), b, ints(1)), op.Slice(g3, b, two_b, ints(1))  # rows of each part
        rows = op.Mul(groups, b)

        def forward(x, rows_of, width: int):
            """x: (B, n1/2, b*b*width) real, rows p1 -> real, imag (B, g*b, b, width) by k3; rows_of: [B]"""
            a = op.Reshape(op.MatMul(m1, x), cat(rows_of, groups, two_b, op.Mul(b, ints(width))))
            a = op.Reshape(op.MatMul(g2, a), cat(rows_of, rows, two_b, ints(width)))
            return op.MatMul(g3_re, a), op.MatMul(g3_im, a)

        # positions are the outer axis already: pad to N/2 rows and read them as (p1, p2 p3 channel)
        x = pad_rows(op.Reshape(u, ints(0, 0, channels)), op.Sub(half, n))
        sr, si = forward(op.Reshape(x, cat(batch, half_n1, ints(-1))), batch, channels)
        k_batch = op.Shape(K, start=0, end=1)  # B, or 1 for a kernel shared by the batch
        k = op.Reshape(pad_rows(K, op.Sub(half, n)), cat(k_batch, half_n1, ints(-1)))
        kr, ki = forward(k, k_batch, heads)

        shape = cat(batch, rows, b, ints(heads, head_dim))
        sr, si = op.Reshape(sr, shape), op.Reshape(si, shape)
        # the complex product as [pr; pi] = [kr; ki] * sr + [-ki; kr] * si, both parts at once along the
        # part axis: three passes over the spectrum where separate real and imaginary parts took seven
        kr, ki = op.Unsqueeze(kr, ints(2, -1)), op.Unsqueeze(ki, ints(2, -1))  # (B, rows, 1, b, heads, 1)
        part = ints(2)  # sr, si: (B, rows, b, heads, d) -> (B, rows, 1, b, heads, d)
        prod = op.Add(op.Mul(cat(kr, ki, axis=2), op.Unsqueeze(sr, part)), op.Mul(cat(op.Neg(ki), kr, axis=2), op.Unsqueeze(si, part)))
        prod = op.Reshape(prod, cat(batch, rows, two_b, ints(channels)))

        a = op.Reshape(op.MatMul(op.Transpose(g3, perm=[0, 2, 1]), prod), cat(batch, groups, two_b, op.Mul(b, ints(channels))))
        a = op.Reshape(op.MatMul(op.Transpose(g2, perm=[0, 2, 1]), a), cat(batch, op.Mul(groups, ints(2)), ints(-1)))
        out = op.Reshape(op.MatMul(m1_inverse, a), cat(batch, half, ints(heads, head_dim)))
        return op.Slice(out, ints(0), n, ints(1))

    return monarch_causal_conv
