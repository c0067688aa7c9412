"""Interchangeable forms of the causal convolution inside `EfficientDsConv`.

Every form computes, for u of shape (b, n, h, d) and K of shape (b, n, h) (or (1, n, h): one kernel
for the whole batch, as the GSS and MHESA kernels are):

    out[b, j, h, :] = sum_{m=0..j} u[b, m, h, :] * K[b, j - m, h]

which is what upstream's `conv1d_fft(u, flip(K))` evaluates (rfft/irfft at
`next_fast_len(2n-1)`, conj, roll, index_select). All forms take and return the
same tensors, hold no parameters, and can be swapped on a loaded model.
"""
from __future__ import annotations

import torch
from torch import nn

from .monarch import monarch_causal_conv

FORMS = ("direct", "fft", "monarch")
CHOICES = FORMS + ("auto",)
# forms a model can be built with: the exportable ones, the FFT at length 2n that torch.export keeps
# symbolic (what `fft` becomes for the pt2 and aoti targets), and upstream's own FFT code (eager only)
MODEL_FORMS = FORMS + ("fft2n", "fft2n_last", "upstream")

# Chosen per export target from `python benchmarks/suite.py` (onnxruntime CPU provider vs TorchScript,
# dim 512, depth 4, 2 threads, lengths 1-4096): see README "Convolution forms".
AUTO_FORM = {"onnx": "switch", "torchscript": "fft", "eager": "fft", "pt2": "fft2n", "aoti": "fft2n", "executorch": "fft2n_last"}
# ONNX `auto` ("switch"): the Toeplitz form up to SWITCH_LENGTH tokens (fewest nodes: it wins while
# n^2 is small), monarch above, picked inside the graph by an If on the sequence length
# (`length_switch.py`); measured crossover between 128 and 256 tokens (README "Benchmarks")
SWITCH_FORMS = ("direct", "monarch")
SWITCH_LENGTH = 128
# torch.export traces Python: a size picked from n by a loop or a table is fixed at the example length
TORCH_EXPORT_TARGETS = ("pt2", "aoti", "executorch")


def resolve_form(form: str, target: str) -> str:
    """Map `auto` to the measured best form for `target`; validate the name."""
    if form == "auto":
        return AUTO_FORM[target]
    if form not in FORMS:
        raise ValueError(f"unknown convolution form {form!r}; choose one of {', '.join(CHOICES)}")
    if target in TORCH_EXPORT_TARGETS:
        if form == "monarch":
            raise ValueError("the monarch form picks its block sizes from n in Python, which torch.export would fix "
                             f"at the example length: use --conv fft or direct for {target}")
        if form == "fft":
            # ExecuTorch's FFT kernels take the last axis of a contiguous tensor only
            return "fft2n_last" if target == "executorch" else "fft2n"
        return form
    return form


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1). Plain int loop so TorchScript keeps it dynamic."""
    length = 1
    while length < n:
        length *= 2
    return length


def upstream_fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Upstream's own evaluation (scipy's next_fast_len, conj/roll/index_select): the reference."""
    from gated_state_spaces_pytorch.dsconv import conv1d_fft

    return conv1d_fft(u, torch.flip(K, dims=(1,)), dim=-3, weight_dim=-2)


def direct_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Toeplitz form: T[b, h, j, m] = K[b, j - m, h] for j >= m (else 0), then T @ u. O(n^2 * h * d).

    T is cut from a tiled vector, not gathered: c = [K reversed, n zeros] (length 2n) repeated n
    times, read from offset n - 1 in rows of stride 2n - 1, has c[n - 1 - j + m] at (j, m), which
    is K[j - m] for j >= m and one of the zeros above the diagonal. In ONNX that is Tile, Slice,
    Reshape, Slice: contiguous copies, several times faster than a GatherND and Where over n^2
    indices. u: (b, n, h, d), K: (b, n, h) -> (b, n, h, d)
    """
    n, h = u.shape[1], u.shape[2]
    kh = K.permute(0, 2, 1)  # (kb, h, n): kb is b, or 1 for a kernel shared by the batch
    c = torch.cat([kh.flip(-1), torch.zeros_like(kh)], -1)  # (kb, h, 2n)
    rows = c.repeat(1, 1, n)[..., n - 1 : n - 1 + n * (2 * n - 1)].reshape(K.shape[0], h, n, 2 * n - 1)
    out = torch.matmul(rows[..., :n], u.permute(0, 2, 1, 3))  # (b, h, n, d)
    return out.permute(0, 2, 1, 3)


def fft_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """FFT form at a power-of-two length >= 2n - 1: exact linear convolution, O(n log n).

    Powers of two keep onnxruntime's DFT on its radix-2 path (its Bluestein path for
    other lengths is slow and loses precision). u: (b, n, h, d), K: (b, n, h) -> (b, n, h, d)
    """
    return fft_conv_at(u, K, next_pow2(2 * u.shape[1] - 1))


def fft2n_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """FFT form at length 2n: a size torch.export keeps symbolic (pt2, aoti), where a power of two
    picked from n by a loop would fix the program to the example length. Still a linear convolution
    (2n >= 2n - 1); torch's FFT is exact at any length. u: (b, n, h, d), K: (b, n, h) -> (b, n, h, d)
    """
    return fft_conv_at(u, K, 2 * u.shape[1])


def fft2n_last_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """`fft2n_causal_conv` with the sequence moved to the last axis of contiguous tensors first (ExecuTorch:
    its FFT kernels refuse the strided layout an FFT along axis 1 returns, and the XNNPACK-lowered program
    stores it). u: (b, n, h, d), K: (b, n, h) -> (b, n, h, d)
    """
    n = u.shape[1]
    fu = torch.fft.rfft(u.permute(0, 2, 3, 1).contiguous(), n=2 * n, dim=-1)  # (b, h, d, n + 1)
    fk = torch.fft.rfft(K.permute(0, 2, 1).contiguous(), n=2 * n, dim=-1).unsqueeze(2)  # (kb, h, 1, n + 1)
    return torch.fft.irfft(fu * fk, n=2 * n, dim=-1)[..., :n].permute(0, 3, 1, 2)


def fft_conv_at(u: torch.Tensor, K: torch.Tensor, length: int) -> torch.Tensor:
    """The causal convolution through rfft/irfft at `length` >= 2n - 1 (zero padding makes it linear)."""
    n = u.shape[1]
    fu = torch.fft.rfft(u, n=length, dim=1)
    fk = torch.fft.rfft(K, n=length, dim=1)
    return torch.fft.irfft(fu * fk.unsqueeze(-1), n=length, dim=1)[:, :n]


def causal_conv_step(
    u_past: torch.Tensor, k_past: torch.Tensor, u_new: torch.Tensor, k_new: torch.Tensor, pad: torch.Tensor
) -> torch.Tensor:
    """The convolution for new positions, given the conv inputs and kernel values before them.

    Slots are shared by the batch: past entries fill slots 0..C-1, the t new ones slots C..C+t-1. Row
    b's absolute position 0 sits at slot pad[b] (slots before it are padding, never read), so a ragged
    batch appends at the same slot in every row while each row keeps its own positions:
    out[b, j] = sum_{m=pad..s} u[m] * K[s - m + pad] with s = C + j.
    u_past: (b, h, capacity, d), head-major, slots 0..C-1 filled and the rest of the capacity (room for
    the tokens to come) finite, never read into the result: the product over the past then reads the
    buffer as it lies, once, with no transpose. k_past: (C, b, h) (C comes from it); u_new: (b, t, h, d),
    k_new: (b, t, h), pad: (b,) int64. Returns (b, t, h, d). Cost O(t * (capacity + t) * h * d).
    """
    C, t, capacity = k_past.shape[0], u_new.shape[1], u_past.shape[2]
    b, h, n = k_new.shape[0], k_new.shape[2], C + t
    # the kernel values as rows of h, one per (slot, batch row), with a zero row last for every tap that must
    # vanish (padding, the future, the room): each tap is then one row, the taps one Gather of 32-byte rows.
    # Building them head-major (transpose, flip, per-element gathers, a mask) cost a third of a 16k step.
    k_rows = torch.cat([k_past, k_new.transpose(0, 1), k_new.new_zeros(1, b, h)]).reshape(-1, h)  # ((n + 1) * b, h)
    s = C + torch.arange(t, device=u_new.device).view(1, t, 1)  # the new positions' slots
    held = torch.arange(capacity, device=u_new.device).view(1, 1, capacity)
    # over the past's whole capacity (the room gets zero taps), then over the new slots up to each one's own
    past_taps = _toeplitz_taps(k_rows, pad, s, held, torch.full_like(s, C), n)
    new_taps = _toeplitz_taps(k_rows, pad, s, s.view(1, 1, t), s + 1, n)
    out = torch.matmul(past_taps, u_past) + torch.matmul(new_taps, u_new.permute(0, 2, 1, 3))
    return out.permute(0, 2, 1, 3)


def _toeplitz_taps(
    k_rows: torch.Tensor, pad: torch.Tensor, s: torch.Tensor, slots: torch.Tensor, bound: torch.Tensor, n: int
) -> torch.Tensor:
    """The taps of positions at slots s (1, t, 1) over `slots` (1, 1, m): (b, h, t, m), where
    tap[b, :, j, m] = k[pad[b] + s_j - m] for pad[b] <= m < bound_j, else the zero row n of k_rows
    ((n + 1) * b, h), whose row slot * b + r holds row r's kernel values at that slot."""
    b = pad.shape[0]
    p = pad.view(b, 1, 1)
    lag = torch.where((slots >= p) & (slots < bound), p + s - slots, n)  # (b, t, m)
    at = lag * b + torch.arange(b, device=pad.device).view(b, 1, 1)
    # a lookup of whole rows: one Gather in ONNX (indexing made a slower GatherND), and no flat index of
    # b * t * t for the new slots, a symbolic pow ExecuTorch cannot size
    return torch.nn.functional.embedding(at, k_rows).permute(0, 3, 1, 2)


def continuation_inputs(
    u_past: torch.Tensor, k_past: torch.Tensor, u_new: torch.Tensor, k_new: torch.Tensor, pad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot as one sequence for a full-sequence form: `form(u, K)[:, C:]` is `causal_conv_step`'s result.

    Row b's position 0 sits at slot pad[b], so its kernel is read from there: K[b, l] = k[pad[b] + l],
    and its padding slots' inputs are zeroed (they hold whatever was fed there). A kernel index past
    the last slot only pairs with such a zeroed input, so clamping it is enough.
    u_past: (C, b, h, d), k_past: (C, b, h), u_new: (b, t, h, d), k_new: (b, t, h), pad: (b,) int64.
    Returns u (b, C + t, h, d) and K (b, C + t, h).
    """
    u = torch.cat([u_past.permute(1, 0, 2, 3), u_new], dim=1)
    k = torch.cat([k_past.permute(1, 0, 2), k_new], dim=1)
    slots = torch.arange(u.shape[1], device=u.device).unsqueeze(0)  # (1, C + t)
    u = u * (slots >= pad.unsqueeze(1)).to(u.dtype).view(u.shape[0], -1, 1, 1)
    idx = (slots + pad.unsqueeze(1)).clamp(max=u.shape[1] - 1)  # (b, C + t)
    return u, torch.gather(k, 1, idx.unsqueeze(-1).expand(-1, -1, k.shape[2]))


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _opaque_op(name: str, conv):
    """`conv(u, K)` as one custom op `gss_export::name` (shape-preserving, differentiable).

    The exporter cannot keep these forms' sizes symbolic (a power of two, a block size chosen from
    n: it would specialise on the example length), so each reaches it as one opaque op whose ONNX
    translation (`onnx_fft.py`, `onnx_monarch.py`) computes the sizes inside the graph.
    """

    def impl(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        return conv(u, K)

    op = torch.library.custom_op(f"gss_export::{name}", impl, mutates_args=())
    op.register_fake(lambda u, K: torch.empty_like(u))

    def backward(ctx, grad: torch.Tensor):
        # gradients of the plain function, so a model under this form trains like any other
        _, vjp = torch.func.vjp(conv, *ctx.saved_tensors)
        return vjp(grad)

    op.register_autograd(backward, setup_context=_save_inputs)
    return op


_fft_causal_conv_op = _opaque_op("fft_causal_conv", fft_causal_conv)
_monarch_causal_conv_op = _opaque_op("monarch_causal_conv", monarch_causal_conv)


class DirectConv(nn.Module):
    """`direct_causal_conv` as a module. forward(u: (b,n,h,d), K: (b,n,h)) -> (b,n,h,d)."""

    def forward(self, u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        return direct_causal_conv(u, K)


class FFTConv(nn.Module):
    """`fft_causal_conv` as a module. forward(u: (b,n,h,d), K: (b,n,h)) -> (b,n,h,d)."""

    def forward(self, u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return fft_causal_conv(u, K)
        return torch.ops.gss_export.fft_causal_conv(u, K)


class FFT2nConv(nn.Module):
    """`fft2n_causal_conv` as a module, traced as plain aten FFT ops (torch.export: pt2, aoti)."""

    def forward(self, u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        return fft2n_causal_conv(u, K)


class FFT2nLastConv(nn.Module):
    """`fft2n_last_causal_conv` as a module (the executorch target's FFT)."""

    def forward(self, u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        return fft2n_last_causal_conv(u, K)


class MonarchConv(nn.Module):
    """`monarch_causal_conv` (the DFT as small matrix products, `monarch.py`) as a module.

    forward(u: (b,n,h,d), K: (b,n,h)) -> (b,n,h,d). One opaque op for the exporter, whose ONNX
    translation (`onnx_monarch.py`) computes the sizes in-graph so the length stays dynamic.
    """

    def forward(self, u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return monarch_causal_conv(u, K)
        return torch.ops.gss_export.monarch_causal_conv(u, K)


class UpstreamConv(nn.Module):
    """Upstream's FFT evaluation, for checking the others; not exportable."""

    def forward(self, u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        return upstream_fft_conv(u, K)


def make_conv(form: str) -> nn.Module:
    """A fresh conv module for a concrete form name (`direct`, `fft`, `monarch` or `upstream`)."""
    return {"direct": DirectConv, "fft": FFTConv, "fft2n": FFT2nConv, "fft2n_last": FFT2nLastConv, "monarch": MonarchConv, "upstream": UpstreamConv}[form]()
