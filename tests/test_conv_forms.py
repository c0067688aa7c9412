"""The convolution forms themselves: equal to upstream's evaluation, differentiable, `auto` by target."""
from __future__ import annotations

import pytest
import torch

from gss_export.conv.forms import (
    AUTO_FORM, causal_conv_step, direct_causal_conv, fft2n_causal_conv, fft_causal_conv, next_pow2, resolve_form,
    upstream_fft_conv,
)
from gss_export.conv.monarch import monarch_causal_conv, monarch_sizes


FORMS = (
    direct_causal_conv, fft_causal_conv, fft2n_causal_conv, monarch_causal_conv,
    lambda u, K: torch.ops.gss_export.fft_causal_conv(u, K), lambda u, K: torch.ops.gss_export.monarch_causal_conv(u, K),
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 64, 65, 128, 129, 300, 1024, 1025])
def test_forms_equal_upstream_in_float64(n):
    torch.manual_seed(n)
    u, K = torch.randn(2, n, 3, 5, dtype=torch.float64), torch.randn(2, n, 3, dtype=torch.float64)
    want = upstream_fft_conv(u, K)
    for form in FORMS:
        assert torch.allclose(form(u, K), want, rtol=0, atol=1e-10)
    # the decoder's form: positions split..n-1 given a past, behind 0 and 3 slots of garbage padding, the
    # head-major past with 0 or 9 slots of room (finite garbage: never read into the result)
    split = n // 2
    for pad, room in ((0, 0), (3, 9)):
        junk_u, junk_k = torch.randn(pad, 2, 3, 5, dtype=torch.float64), torch.randn(pad, 2, 3, dtype=torch.float64)
        u_past = torch.cat([junk_u, u[:, :split].transpose(0, 1), torch.randn(room, 2, 3, 5, dtype=torch.float64)]).permute(1, 2, 0, 3)
        k_past = torch.cat([junk_k, K[:, :split].transpose(0, 1)])
        got = causal_conv_step(u_past, k_past, u[:, split:], K[:, split:], torch.tensor([pad, pad]))
        assert torch.allclose(got, want[:, split:], rtol=0, atol=1e-10)


def test_step_form_keeps_rows_of_a_ragged_batch_apart():
    torch.manual_seed(0)
    lengths, new = (5, 2), 3
    seqs = [(torch.randn(n + new, 2, 4, dtype=torch.float64), torch.randn(n + new, 2, dtype=torch.float64)) for n in lengths]
    longest = max(lengths)
    u_past = torch.zeros(longest, 2, 2, 4, dtype=torch.float64)
    k_past = torch.zeros(longest, 2, 2, dtype=torch.float64)
    for row, ((u, k), n) in enumerate(zip(seqs, lengths)):
        u_past[longest - n :, row], k_past[longest - n :, row] = u[:n], k[:n]  # left-padded storage
    u_new = torch.stack([u[n:] for (u, _), n in zip(seqs, lengths)])
    k_new = torch.stack([k[n:] for (_, k), n in zip(seqs, lengths)])
    got = causal_conv_step(u_past.permute(1, 2, 0, 3), k_past, u_new, k_new, torch.tensor([longest - n for n in lengths]))
    for row, ((u, k), n) in enumerate(zip(seqs, lengths)):
        want = upstream_fft_conv(u[None], k[None])[0, n:]
        assert torch.allclose(got[row], want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("op", ["fft_causal_conv", "monarch_causal_conv"])
def test_custom_ops_are_differentiable(op):
    conv = getattr(torch.ops.gss_export, op)
    u = torch.randn(2, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    K = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (u, K))
    got = torch.autograd.grad(conv(u, K).square().sum(), (u, K))
    want = torch.autograd.grad(direct_causal_conv(u, K).square().sum(), (u, K))
    assert all(torch.allclose(g, w, atol=1e-10) for g, w in zip(got, want))


def test_monarch_sizes_give_a_linear_convolution_with_little_padding():
    for n in range(1, 5000):
        n1, b = monarch_sizes(n)
        length = n1 * b * b
        assert n1 % 2 == 0 and length >= 2 * n, n  # no wrap-around
        assert length // 2 - n < b * b, n  # padded by less than one block
        assert b in (1, 2, 4, 8, 16)


def test_auto_resolves_per_target_and_names_are_checked():
    assert resolve_form("auto", "onnx") == AUTO_FORM["onnx"] == "switch"  # direct up to 128 tokens, then monarch
    assert resolve_form("auto", "torchscript") == AUTO_FORM["torchscript"] == "fft"
    assert resolve_form("fft", "onnx") == "fft"
    # torch.export targets: the FFT at the symbolic length 2n; monarch's Python-side sizes are refused
    assert resolve_form("auto", "pt2") == resolve_form("fft", "aoti") == "fft2n"
    assert resolve_form("direct", "pt2") == "direct"
    with pytest.raises(ValueError, match="torch.export"):
        resolve_form("monarch", "aoti")
    with pytest.raises(ValueError, match="unknown convolution form 'sideways'"):
        resolve_form("sideways", "onnx")


def test_next_pow2():
    assert [next_pow2(n) for n in (1, 2, 3, 4, 5, 255, 256, 257)] == [1, 2, 4, 4, 8, 256, 256, 512]
