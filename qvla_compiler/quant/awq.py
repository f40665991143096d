"""AWQ-style activation-aware weight scaling (Lin et al. 2024, llm-awq `auto_scale`). Pure functions on tensors.

Y = X Wᵀ = (X diag(s)⁻¹)(W diag(s))ᵀ, as in SmoothQuant (same direction, so the SmoothQuant folds, passes/smooth_linears.py, apply s).
Channels with large activations get s_j > 1: their weight column is magnified before rounding, so its relative
rounding error — which the large activation would amplify — shrinks. AWQ searches one exponent α on a grid:

    s(α) = m^α / √(max m^α · min m^α),   m_j = mean_t |X_tj| (or max; clamped ≥ 1e-4 after the power),
    α* = argmin_α Σ_i ‖X W_iᵀ − (X/s) Q(W_i diag(s))ᵀ‖²,   α ∈ {0, 1/grid, …, 1},

over every linear W_i reading X, with Q the plain round-to-nearest of `quantize_weight`. α = 0 gives s = 1, i.e.
plain rounding, so on the sample the chosen α never does worse than rounding without scales.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qvla_compiler.errors import CalibrationError, RecipeError, ShapeError
from qvla_compiler.kernels.ops import WEIGHT_BITS
from qvla_compiler.quant.quantizers import dequantize_weight, quantize_weight
from qvla_compiler.quant.smoothquant import fill_silent_channels

_S_MIN = 1e-4  # floor of m^α: a channel that never fired must not get a zero (non-invertible) scale


def awq_scales(act_stat: Tensor, alpha: float) -> Tensor:
    """s(α) [K] from the per-channel activation statistic m [K] (mean or max of |x|), normalised so that
    max(s)·min(s) = 1 (the result is unchanged by a global factor; this keeps s near 1). A channel silent in
    calibration is scaled as the median one (smoothquant.fill_silent_channels)."""
    s = fill_silent_channels(act_stat.double().clamp_min(0)).pow(alpha).clamp_min(_S_MIN)
    return (s / (s.max() * s.min()).sqrt()).float()


def awq_search_scales(weights: Tensor | Sequence[Tensor], act_stat: Tensor, x_sample: Tensor, bits: int,
                      group_size: int = 128, grid: int = 20, clip: str = "absmax") -> tuple[Tensor, float]:
    """(s [K], α*) for the linears `weights` (each [N_i, K], all reading the activation x), minimising the output
    MSE of the quantized, scaled linears on `x_sample` [..., K] over α ∈ {i/grid}. Apply as W_i·diag(s), x/s.

    Example::

        >>> x = torch.randn(256, 64); x[:, :4] *= 30
        >>> w = torch.randn(32, 64) / 8
        >>> s, alpha = awq_search_scales(w, x.abs().mean(0), x, bits=4, group_size=32)
        >>> s.shape, 0.0 <= alpha <= 1.0
        (torch.Size([64]), True)
    """
    ws, x = _checked(weights, act_stat, x_sample, bits, grid, clip)
    ref = [x @ w.T for w in ws]
    best = None
    for i in range(grid + 1):
        alpha = i / grid
        s = awq_scales(act_stat, alpha)
        err = _output_error(ws, ref, x, s, bits, group_size, clip)
        if best is None or err < best[0]:  # strict: ties keep the smaller α (α = 0 is plain rounding)
            best = (err, s, alpha)
    return best[1], best[2]


def _output_error(ws: list[Tensor], ref: list[Tensor], x: Tensor, s: Tensor, bits: int, group_size: int,
                  clip: str) -> float:
    """Σ_i ‖X W_iᵀ − (X/s) Q(W_i diag(s))ᵀ‖² over the sample, in float64 so that ties between α are real ties."""
    xs = x / s
    total = 0.0
    for w, y in zip(ws, ref):
        scaled = w * s
        deq = dequantize_weight(*quantize_weight(scaled, bits, group_size, clip), bits, w.shape[1], group_size)
        total += (y.double() - (xs @ deq.T).double()).pow(2).sum().item()
    return total


def _checked(weights, act_stat: Tensor, x_sample: Tensor, bits: int, grid: int,
             clip: str) -> tuple[list[Tensor], Tensor]:
    ws = [weights] if isinstance(weights, Tensor) else list(weights)
    k = act_stat.shape[-1] if act_stat.dim() == 1 else -1
    if not ws or k < 1 or any(w.dim() != 2 or w.shape[1] != k for w in ws) or x_sample.shape[-1] != k:
        raise ShapeError(f"awq_search_scales: need act_stat [K], every weight [N_i, K] and x_sample [..., K]; got "
                         f"{tuple(act_stat.shape)}, {[tuple(w.shape) for w in ws]}, {tuple(x_sample.shape)}")
    if bits not in WEIGHT_BITS or grid < 1 or clip not in ("absmax", "mse"):
        raise RecipeError(f"awq_search_scales: bits must be one of {WEIGHT_BITS}, grid ≥ 1, clip 'absmax' or "
                          f"'mse'; got bits {bits}, grid {grid}, clip {clip!r}")
    x = x_sample.detach().reshape(-1, k).float()
    if x.shape[0] == 0 or not torch.isfinite(x).all() or not torch.isfinite(act_stat).all():
        raise CalibrationError("awq_search_scales: the activation sample is empty or the sample/statistics hold "
                               "NaN/Inf; check the calibration data")
    return [w.detach().float() for w in ws], x
