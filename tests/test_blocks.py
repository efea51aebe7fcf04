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


# -- oneDNN ---------------------------------------------------------------------------------------
def test_the_pinned_torch_build_has_onednn():
    assert blocks.onednn_available()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (3, 1, 96), (16, 96), (4, 70, 96), (1100, 96), (0, 1, 96)])
def test_packed_linear_matches_nn_linear(shape, bias):
    """A weight packed for oneDNN gives nn.Linear's values to float32 rounding, in nn.Linear's shape."""
    torch.manual_seed(0)
    plain = nn.Linear(96, 200, bias=bias)
    packed = blocks.Linear(96, 200, bias=bias)
    packed.load_state_dict(plain.state_dict())
    packed.pack()
    x = torch.randn(shape)
    with torch.inference_mode():
        want, got = plain(x), packed(x)
        strided = packed(torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2])  # a non-contiguous input
    assert got.shape == want.shape == strided.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packing_releases_the_plain_weight_and_unpacking_restores_it():
    torch.manual_seed(0)
    linear = blocks.Linear(64, 32)
    weight = linear.weight.detach().clone()
    linear.pack()
    assert linear.weight.is_meta and linear.weight.shape == (32, 64)  # no second copy in memory
    linear.unpack()
    assert linear.packed is None and torch.equal(linear.weight, weight)
    kept = blocks.Linear(64, 32)
    kept.pack(keep_weight=True)
    assert not kept.weight.is_meta and kept.packed is not None


@pytest.mark.parametrize("variant, matmul", [("pg1_tied", "onednn"), ("pg1_untied", "onednn+gelu")])
def test_a_model_loaded_for_onednn_packs_every_linear_and_keeps_a_tied_head(make_ckpt, variant, matmul):
    from vlmbatch.model.loading import load_model, resolve_checkpoint

    checkpoint = resolve_checkpoint(str(make_ckpt(variant).path))
    model = load_model(checkpoint, cpu_matmul=matmul)
    linears = [m for m in model.modules() if isinstance(m, blocks.Linear)]
    cfg = model.cfg
    assert len(linears) == 6 * cfg.vision.num_hidden_layers + 1 + 7 * cfg.text.num_hidden_layers + 1  # and the head
    assert all(m.packed is not None and m.fused_gelu == (matmul == "onednn+gelu") for m in linears)
    tied = variant == "pg1_tied"
    assert (model.lm_head.weight is model.text.embed_tokens.weight) == tied
    assert model.lm_head.weight.is_meta != tied
    assert all(m.weight.is_meta for m in linears if m is not model.lm_head)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert all(m.packed is None for m in load_model(checkpoint).modules() if isinstance(m, blocks.Linear))


def test_choose_cpu_matmul(monkeypatch):
    for choice in ("torch", "onednn", "onednn+gelu"):
        assert blocks.choose_cpu_matmul(choice) == choice
    assert blocks.choose_cpu_matmul("onednn", dtype=torch.bfloat16) == "torch"
    assert blocks.choose_cpu_matmul("onednn+gelu", device=torch.device("cuda")) == "torch"

    def timed(**seconds):
        monkeypatch.setattr(blocks, "cpu_matmul_timings", lambda: seconds)

    timed(torch=7.5, onednn=3.1, **{"onednn+gelu": 2.7})  # as on an AVX-512 AMD processor (Zen 5)
    assert blocks.choose_cpu_matmul("auto") == "onednn+gelu"
    timed(torch=5.9, onednn=5.0, **{"onednn+gelu": 6.5})  # as on an AVX2 one (Zen 3)
    assert blocks.choose_cpu_matmul("auto") == "onednn"
    timed(torch=4.0, onednn=5.0, **{"onednn+gelu": 6.5})  # MKL the fastest: keep torch's
    assert blocks.choose_cpu_matmul("auto") == "torch"
    monkeypatch.setattr(blocks, "onednn_available", lambda: False)
    assert blocks.choose_cpu_matmul("auto") == "torch"
    for choice in ("onednn", "onednn+gelu"):
        with pytest.raises(ValueError, match="no oneDNN"):
            blocks.choose_cpu_matmul(choice)
    with pytest.raises(ValueError, match="unknown CPU matmul 'mkl'"):
        blocks.choose_cpu_matmul("mkl")


def test_cpu_matmul_timings_time_each_way():
    timings = blocks.cpu_matmul_timings(rows=32, d_in=64, d_out=128, repeats=2)
    assert set(timings) == set(blocks.CPU_MATMULS) - {"auto"}
    assert all(0 < seconds < 1 for seconds in timings.values())


@pytest.mark.parametrize("packed", [None, "fused_gelu", "gelu_apart"])
@pytest.mark.parametrize("shape", [(5, 96), (2, 300, 96), (0, 96)])
def test_fused_gelu_and_gate_products_match_the_separate_ops(shape, packed):
    """Linear.gelu_tanh and Linear.times, which oneDNN fuses into the product when packed (the GELU
    only with fused_gelu)."""
    torch.manual_seed(0)
    gate, up = blocks.Linear(96, 200, bias=True), blocks.Linear(96, 200, bias=False)
    x = torch.randn(shape)
    with torch.inference_mode():
        g = F.gelu(F.linear(x, gate.weight, gate.bias), approximate="tanh")
        want_gelu, want_times = g, F.linear(x, up.weight) * g
        if packed:
            gate.pack(fused_gelu=packed == "fused_gelu"), up.pack()
            assert gate.fused_gelu == (packed == "fused_gelu")
        got_gelu = gate.gelu_tanh(x)
        got_times = up.times(x, got_gelu)
    assert got_gelu.shape == want_gelu.shape and got_times.shape == want_times.shape
    torch.testing.assert_close(got_gelu, want_gelu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_times, want_times, rtol=1e-5, atol=1e-5)
