"""GPTQ as pure functions: the Hessian, damping, dead inputs, group-aware order, and that it beats RTN."""

from __future__ import annotations

import pytest
import torch

from owl3.quantize.gptq import (
    GPTQError,
    Hessian,
    gptq_quantize,
    group_aware_order,
    inverse_factor,
    output_error,
)
from owl3.quantize.qmath import rtn_quantize


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.3) + torch.randn(
        tokens, k, generator=g
    )
    x[:, :4] *= 8
    return x


def relative_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    reference = x @ weight.t()
    return float(((x @ quantized.t() - reference) ** 2).sum() / (reference**2).sum())


def test_hessian_is_two_over_n_xtx_over_batches() -> None:
    x = correlated_inputs(50, 16)
    h = Hessian(16)
    h.add(x[:20].reshape(2, 10, 16))  # any leading shape: every position is a token
    h.add(x[20:])
    assert h.tokens == 50
    torch.testing.assert_close(h.finish(), 2 / 50 * x.t() @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(GPTQError, match="no calibration tokens"):
        Hessian(4).finish()


@pytest.mark.parametrize(
    ("bits", "group", "act_order"), [(4, 128, False), (4, 128, True), (4, 32, True), (8, 256, True)]
)
def test_gptq_beats_round_to_nearest(bits: int, group: int, act_order: bool) -> None:
    x, weight = correlated_inputs(1024, 256), torch.randn(48, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    h = Hessian(256)
    h.add(x)
    result = gptq_quantize(weight, h.finish(), bits, group, act_order=act_order, tokens=h.tokens)
    ours = relative_error(x, weight, result.weight.dequantize())
    rtn = relative_error(x, weight, rtn_quantize(weight, bits, group).dequantize())
    assert ours < 0.9 * rtn
    assert result.relative_error == pytest.approx(ours, rel=1e-3)  # computed from H, exact over the tokens
    assert result.weight.has_trivial_g_idx()  # act order never leaves contiguous groups
    assert result.weight.scales.dtype == torch.float16 and result.damp == 0.05


def test_group_aware_order_keeps_groups_contiguous() -> None:
    diag = torch.tensor([1.0, 9.0, 2.0, 3.0, 0.5, 0.1, 7.0, 8.0])
    order = group_aware_order(diag, 4)
    assert order.tolist() == [1, 3, 2, 0, 7, 6, 4, 5]  # group 0 (max 9) first, each sorted by diag
    assert {int(i) // 4 for i in order[:4]} == {0}


def test_dead_inputs_are_zeroed_and_the_hessian_is_left_unchanged() -> None:
    x = correlated_inputs(256, 64)
    x[:, 5] = 0  # channel 5 never active
    h = Hessian(64)
    h.add(x)
    hessian = h.finish()
    before = hessian.clone()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    result = gptq_quantize(weight, hessian, 4, 32, act_order=False)
    assert torch.equal(hessian, before)
    assert bool((result.weight.dequantize()[:, 5] == 0).all())
    assert torch.isfinite(torch.tensor(result.loss))
    assert output_error(weight, result.weight.dequantize(), hessian) == pytest.approx(result.relative_error)


def test_damping_rises_until_cholesky_succeeds_and_restores_h() -> None:
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    hessian = 2 / 3 * x.t() @ x  # rank 3 of 32: singular without damping
    hessian[0, 0] -= 0.5 * float(hessian.diagonal().mean())  # and slightly indefinite
    before = hessian.clone()
    upper, damp = inverse_factor(hessian, 0.001)
    assert damp > 0.001 and torch.equal(hessian, before)
    assert bool(torch.isfinite(upper).all()) and torch.equal(upper, upper.triu())
    with pytest.raises(GPTQError, match="not positive definite"):
        inverse_factor(-torch.eye(4), 0.05)


def test_per_channel_uses_one_scale_per_output_across_blocks() -> None:
    x, weight = correlated_inputs(512, 384), torch.randn(8, 384, generator=torch.Generator().manual_seed(6))
    h = Hessian(384)
    h.add(x)
    result = gptq_quantize(weight, h.finish(), 8, 384)  # K spans three 128-column blocks
    assert result.weight.scales.shape == (1, 8)
    expected = (2 * weight.abs().amax(dim=1) / 255).to(torch.float16)  # chosen once, from the whole row
    torch.testing.assert_close(result.weight.scales[0], expected, rtol=0, atol=0)
