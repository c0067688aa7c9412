"""ONNX translation of `gss_export::fft_causal_conv`: DFT at a power-of-two length chosen in-graph.

The length L = smallest power of two >= 2n - 1 is picked from a constant table with
integer ops (no float log2 rounding), so one file serves every sequence length exactly.
Complex values stay as trailing real pairs, as ONNX's DFT expects. onnxruntime has no
one-sided inverse DFT, so the inverse rebuilds the full Hermitian spectrum first.
"""
from __future__ import annotations

from onnxscript import opset17, opset18, opset19, opset20, opset21, opset22, opset23

_OPSETS = {17: opset17, 18: opset18, 19: opset19, 20: opset20, 21: opset21, 22: opset22, 23: opset23}
_POW2 = [1 << k for k in range(40)]
MIN_OPSET = 17  # DFT first appears in opset 17


def fft_conv_translation(opset: int):
    """The translation function for the custom op, written against ONNX opset `opset`."""
    if opset not in _OPSETS:
        raise ValueError(f"the FFT form needs opset 17-23 (ONNX DFT); got {opset}")
    op = _OPSETS[opset]
    # opset 20 moved DFT's `axis` from an attribute to an input
    axis_is_input = opset >= 20

    def dft(x, length, inverse: int, onesided: int):
        if axis_is_input:
            return op.DFT(x, length, op.Constant(value_int=1), inverse=inverse, onesided=onesided)
        return op.DFT(x, length, axis=1, inverse=inverse, onesided=onesided)

    def part(x, index: int):
        # Slice, not Split: Split changed in opset 18 and has no adapter back to 17
        return op.Slice(x, op.Constant(value_ints=[index]), op.Constant(value_ints=[index + 1]), op.Constant(value_ints=[-1]))

    def fft_causal_conv(u, K):
        """u: (b, n, h, d) float, K: (b, n, h) float -> (b, n, h, d)"""
        n = op.Shape(u, start=1, end=2)  # [n]
        target = op.Sub(op.Mul(n, op.Constant(value_ints=[2])), op.Constant(value_ints=[1]))
        pow2 = op.Constant(value_ints=_POW2)
        # first table entry >= 2n-1 (ArgMax returns the first maximum); ReduceMin has no clean path to opset 17
        first = op.ArgMax(op.Cast(op.GreaterOrEqual(pow2, target), to=6), axis=0, keepdims=0)
        length = op.Gather(pow2, first)  # scalar L

        fu = dft(op.Unsqueeze(u, op.Constant(value_ints=[-1])), length, 0, 1)  # (b, L/2+1, h, d, 2)
        fk = dft(op.Unsqueeze(K, op.Constant(value_ints=[-1, -2])), length, 0, 1)  # (b, L/2+1, h, 1, 2)
        ur, ui = part(fu, 0), part(fu, 1)
        kr, ki = part(fk, 0), part(fk, 1)
        pr = op.Sub(op.Mul(ur, kr), op.Mul(ui, ki))
        pi = op.Add(op.Mul(ur, ki), op.Mul(ui, kr))

        # full spectrum: bins L/2+1 .. L-1 are conj(bins L/2-1 .. 1)
        half = op.Div(length, op.Constant(value_int=2))
        mirror = op.Range(op.Sub(half, op.Constant(value_int=1)), op.Constant(value_int=0), op.Constant(value_int=-1))
        full_r = op.Concat(pr, op.Gather(pr, mirror, axis=1), axis=1)
        full_i = op.Concat(pi, op.Neg(op.Gather(pi, mirror, axis=1)), axis=1)
        y = dft(op.Concat(full_r, full_i, axis=-1), length, 1, 0)  # (b, L, h, d, 2)

        real = op.Squeeze(part(y, 0), op.Constant(value_ints=[-1]))
        return op.Slice(real, op.Constant(value_ints=[0]), n, op.Constant(value_ints=[1]))

    return fft_causal_conv
