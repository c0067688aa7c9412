"""The convolution forms themselves: equal to upstream's evaluation, differentiable, `auto` by target."""
from __future__ import annotations

import pytest
import torch

from gss_export.conv_forms import (
    AUTO_FORM, causal_conv_at, direct_causal_conv, fft_causal_conv, next_pow2, resolve_form, upstream_fft_conv,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 129, 300])
def test_forms_equal_upstream_in_float64(n):
    torch.manual_seed(n)
    u, K = torch.randn(2, n, 3, 5, dtype=torch.float64), torch.randn(2, n, 3, dtype=torch.float64)
    want = upstream_fft_conv(u, K)
    for form in (direct_causal_conv, fft_causal_conv, lambda u, K: torch.ops.gss_export.fft_causal_conv(u, K)):
        assert torch.allclose(form(u, K), want, rtol=0, atol=1e-10)
    # at chosen positions only (the decoder's form), here all of them
    positions = torch.arange(n).expand(2, n)
    assert torch.allclose(causal_conv_at(u, K, positions), want, rtol=0, atol=1e-10)


def test_fft_op_is_differentiable():
    u = torch.randn(2, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    K = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.gss_export.fft_causal_conv, (u, K))
    got = torch.autograd.grad(torch.ops.gss_export.fft_causal_conv(u, K).square().sum(), (u, K))
    want = torch.autograd.grad(direct_causal_conv(u, K).square().sum(), (u, K))
    assert all(torch.allclose(g, w, atol=1e-10) for g, w in zip(got, want))


def test_auto_resolves_per_target_and_names_are_checked():
    assert resolve_form("auto", "onnx") == AUTO_FORM["onnx"] == "direct"
    assert resolve_form("auto", "torchscript") == AUTO_FORM["torchscript"] == "fft"
    assert resolve_form("fft", "onnx") == "fft"
    with pytest.raises(ValueError, match="unknown convolution form 'sideways'"):
        resolve_form("sideways", "onnx")


def test_next_pow2():
    assert [next_pow2(n) for n in (1, 2, 3, 4, 5, 255, 256, 257)] == [1, 2, 4, 4, 8, 256, 256, 512]
