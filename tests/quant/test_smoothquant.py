"""SmoothQuant scales and folding: formula, exactness of the folded pairs, error cases."""

import pytest
import torch

from qvla_compiler.errors import CalibrationError, ShapeError
from qvla_compiler.quant.smoothquant import (
    activation_absmax,
    smoothquant_scales,
)


def test_scales_follow_the_formula_over_fused_consumers():
    x = torch.randn(4, 10, 8, dtype=torch.float64)
    wq, wk = torch.randn(6, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    s = smoothquant_scales(activation_absmax(x), [wq, wk], alpha=0.7)
    w_max = torch.maximum(wq.abs().amax(0), wk.abs().amax(0))
    torch.testing.assert_close(s, x.abs().amax((0, 1)) ** 0.7 / w_max ** 0.3)
    assert torch.equal(smoothquant_scales(activation_absmax(x), wq), smoothquant_scales(activation_absmax(x), [wq]))


def test_clamps_dead_channels():
    act = torch.tensor([0.0, 2.0, 3.0])
    w = torch.tensor([[1.0, 0.0, 2.0]])
    s = smoothquant_scales(act, w)
    assert (s >= 1e-5).all() and torch.isfinite(s).all()


def test_a_channel_silent_in_calibration_is_scaled_as_a_typical_one():
    """A ReLU unit calibration never saw fire used to get s ≈ 1e-3 of the others: the day it fires, x/s is 1000× the
    token's other channels and they all round to zero (a state encoder at W8A8 + DuQuant: rel-L2 0.72)."""
    act, w = torch.tensor([0.0, 1e-6, 1.0, 2.0, 3.0]), torch.ones(1, 5)
    s = smoothquant_scales(act, w, alpha=0.6)
    torch.testing.assert_close(s[:2], torch.full((2,), 2.0 ** 0.6))  # the median of the seen channels, 2.0
    torch.testing.assert_close(s[2:], act[2:] ** 0.6)
    assert torch.isfinite(smoothquant_scales(torch.zeros(3), torch.ones(1, 3))).all()  # all silent: nothing to copy


def test_norm_to_linears_fold_is_exact():
    ln = torch.nn.LayerNorm(16, dtype=torch.float64)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(32, 16, dtype=torch.float64)
    x[:, 3] *= 40  # an outlier channel feeding the norm output
    ws = [torch.randn(8, 16, dtype=torch.float64) for _ in range(3)]  # q, k, v
    h = ln(x)
    s = smoothquant_scales(activation_absmax(h), ws, alpha=0.5)
    g, b = ln.weight / s, ln.bias / s  # the norm now emits x / s
    h_s = torch.nn.functional.layer_norm(x, (16,), g, b)
    torch.testing.assert_close(h_s, h / s)
    for w in ws:
        torch.testing.assert_close(h_s @ (w * s).T, h @ w.T, rtol=1e-9, atol=1e-9)
    assert activation_absmax(h_s).max() / activation_absmax(h_s).min() < activation_absmax(h).max() / \
        activation_absmax(h).min()


def test_producer_consumer_fold_through_swiglu_is_exact():
    x = torch.randn(10, 12, dtype=torch.float64)
    gate, up, down = (torch.randn(20, 12, dtype=torch.float64), torch.randn(20, 12, dtype=torch.float64),
                      torch.randn(12, 20, dtype=torch.float64))
    b_up = torch.randn(20, dtype=torch.float64)
    h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T + b_up)
    s = smoothquant_scales(activation_absmax(h), down, alpha=0.5)
    up_s, b_up_s = up / s[:, None], b_up / s  # the producing rows divided by s
    h_s = torch.nn.functional.silu(x @ gate.T) * (x @ up_s.T + b_up_s)
    torch.testing.assert_close(h_s @ (down * s).T, h @ down.T, rtol=1e-9, atol=1e-9)


def test_errors():
    with pytest.raises(ShapeError):
        smoothquant_scales(torch.ones(8), torch.ones(4, 7))
    with pytest.raises(CalibrationError):
        smoothquant_scales(torch.tensor([1.0, float("nan")]), torch.ones(3, 2))
