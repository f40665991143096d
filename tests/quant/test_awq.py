"""AWQ-style scale search: formula, never worse than plain rounding, helps on outlier channels, exact fold."""

import pytest
import torch

from qvla_compiler.errors import CalibrationError, RecipeError, ShapeError
from qvla_compiler.quant.awq import awq_scales, awq_search_scales
from qvla_compiler.quant.quantizers import dequantize_weight, quantize_weight


def _outlier_inputs(n_tok: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, k, generator=g)
    x[:, torch.arange(0, k, 37)] *= 25  # a few outlier channels, as in LLM/VLA activations
    return x


def _weights(k: int, rows=(48, 16)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, k, generator=g) / k ** 0.5 for n in rows]


def _mse(ws, x, s, bits, gs):
    total = 0.0
    for w in ws:
        deq = dequantize_weight(*quantize_weight(w * s, bits, gs), bits, w.shape[1], gs)
        total += ((x @ w.T - (x / s) @ deq.T) ** 2).sum().item()
    return total


def test_scales_follow_the_formula():
    m = torch.tensor([0.0, 0.5, 2.0, 8.0])
    s = awq_scales(m, 0.5)
    raw = torch.tensor([2.0, 0.5, 2.0, 8.0]).double().pow(0.5)  # the silent channel is scaled as the median one
    torch.testing.assert_close(s, (raw / (raw.max() * raw.min()).sqrt()).float())
    assert torch.equal(awq_scales(m, 0.0), torch.ones(4))


@pytest.mark.parametrize("bits,gs", [(4, 128), (4, -1), (4, 32), (8, -1)])
def test_beats_or_ties_plain_rounding_and_helps_on_outliers(bits, gs):
    k = 256
    x, ws = _outlier_inputs(1024, k), _weights(k)
    s, alpha = awq_search_scales(ws, x.abs().mean(0), x, bits, gs)
    ones = torch.ones(k)
    assert _mse(ws, x, s, bits, gs) <= _mse(ws, x, ones, bits, gs)
    assert 0 < alpha <= 1  # outliers present: some scaling must win
    # the scales generalise to new tokens from the same distribution; measured held-out MSE ratios (α): int4 g128
    # 0.35 (0.25), int4 per row 0.46 (0.25), int4 g32 0.17 (0.35), int8 0.45 (0.25)
    held_out = _outlier_inputs(1024, k, seed=7)
    assert _mse(ws, held_out, s, bits, gs) < 0.6 * _mse(ws, held_out, ones, bits, gs)


def test_returns_the_scales_of_the_chosen_alpha_and_accepts_absmax():
    k = 64
    x, ws = _outlier_inputs(256, k), _weights(k)
    for stat in (x.abs().mean(0), x.abs().amax(0)):
        s, alpha = awq_search_scales(ws, stat, x, 4, 32, grid=10)
        assert alpha in [i / 10 for i in range(11)]
        torch.testing.assert_close(s, awq_scales(stat, alpha))


def test_uniform_channels_keep_alpha_zero():
    # every channel alike: all s(α) are 1 up to rounding, so no α beats α = 0 by more than a tie
    x = torch.randn(256, 64)
    s, alpha = awq_search_scales(_weights(64), torch.ones(64), x, 4, 32)
    assert alpha == 0.0 and torch.equal(s, torch.ones(64))


def test_folded_scales_are_exact_in_float():
    x, (w, _) = _outlier_inputs(64, 96).double(), _weights(96)
    s, _ = awq_search_scales(w, x.abs().mean(0).float(), x.float(), 4, 32)
    torch.testing.assert_close((x / s.double()) @ (w.double() * s.double()).T, x @ w.double().T)


def test_batched_sample_and_dead_channels():
    x = _outlier_inputs(4 * 32, 64).reshape(4, 32, 64)
    x[..., 5] = 0
    s, _ = awq_search_scales(_weights(64)[0], x.abs().mean((0, 1)), x, 4, 32)
    assert torch.isfinite(s).all() and (s > 0).all()


def test_errors():
    w, x = torch.randn(8, 16), torch.randn(4, 16)
    with pytest.raises(ShapeError):
        awq_search_scales(w, torch.ones(15), x, 4, 8)
    with pytest.raises(ShapeError):
        awq_search_scales([w, torch.randn(8, 15)], torch.ones(16), x, 4, 8)
    with pytest.raises(RecipeError):
        awq_search_scales(w, torch.ones(16), x, 5, 8)
    with pytest.raises(CalibrationError):
        awq_search_scales(w, torch.ones(16), torch.full((4, 16), float("nan")), 4, 8)
