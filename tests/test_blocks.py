"""The CPU fast paths of `vlmbatch.model.blocks` compute what the plain torch ops compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmbatch.model import blocks


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 96), (16, 1, 96), (8, 8, 96), (65, 96), (4, 70, 96), (0, 1, 96)])
def test_linear_matches_nn_linear(shape, bias):
    """Few rows take the weight-major product, the rest nn.Linear's; same values, shape and layout."""
    torch.manual_seed(0)
    plain = nn.Linear(96, 200, bias=bias)
    fast = blocks.Linear(96, 200, bias=bias)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(shape)
    with torch.inference_mode():
        want, got = plain(x), fast(x)
    assert got.shape == want.shape and got.is_contiguous()
    if x.numel() > blocks.FEW_ROWS * x.shape[-1]:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_linear_loads_under_nn_linear_names():
    fast = blocks.Linear(4, 3, bias=True)
    assert isinstance(fast, nn.Linear)
    assert set(fast.state_dict()) == {"weight", "bias"}


def test_gelu_tanh_is_the_tanh_approximation_to_float32_rounding():
    x = torch.cat([torch.randn(200_000) * scale for scale in (0.1, 1.0, 4.0, 30.0)]
                  + [torch.linspace(-25, 25, 20_001), torch.tensor([0.0, -0.0, 1e4, -1e4, 3e38, -3e38])])
    with torch.inference_mode():
        got = blocks.gelu_tanh(x)
    want = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # Against float64 it is at least as accurate as torch's own float32 form.
    exact = F.gelu(x.double(), approximate="tanh")
    assert (got.double() - exact).abs().max() <= 1.5 * (want.double() - exact).abs().max()
    assert not blocks.gelu_tanh(torch.tensor([float("nan")])).isfinite().any()


def test_gelu_tanh_outside_inference_is_torchs_and_differentiable():
    x = torch.randn(1000, requires_grad=True)
    y = blocks.gelu_tanh(x)
    assert torch.equal(y, F.gelu(x, approximate="tanh"))
    y.sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
