"""SmoothQuant scales and folding (Xiao et al. 2023; quantvla.md §11). Pure functions on tensors.

Y = X Wᵀ = (X diag(s)⁻¹)(W diag(s))ᵀ: per input channel j, divide the activation by s_j (folded into the producer:
a norm's weight/bias or the rows of a preceding linear) and multiply column j of every consumer weight by s_j.

    s_j = max_t|X_tj|^α / (max over consumers, rows o of |W[o, j]|)^(1−α), both factors clamped ≥ 1e-5.

A channel calibration never saw active (max < 1e-3 of the largest, e.g. a ReLU unit silent on a few state tokens)
takes the median channel's max instead: its true range is unknown, and s_j ≈ 0 would blow it up 1000× the day it
fires, leaving every other channel of the token to round to zero (StateValueHead at W8A8: rel-L2 0.72, RESULTS §9c).

Note: QuantVLA's own "SmoothQuant" baseline applies the inverse (weight / s, x · s); this module follows the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qvla_compiler.errors import CalibrationError, ShapeError

_CLAMP = 1e-5


def activation_absmax(x: Tensor) -> Tensor:
    """Per-channel max_t |x_tj| over every leading dim of x [..., d]."""
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(0)


def _weights(weights: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [weights] if isinstance(weights, Tensor) else list(weights)


def smoothquant_scales(act_absmax: Tensor, weights: Tensor | Sequence[Tensor], alpha: float = 0.5) -> Tensor:
    """s [d] for the consumers `weights` (each [N_i, d], all reading the same activation).

    Example::

        >>> x, w = torch.randn(16, 8), torch.randn(4, 8)
        >>> s = smoothquant_scales(activation_absmax(x), w, alpha=0.5)
        >>> torch.allclose((x / s) @ (w * s).T, x @ w.T, atol=1e-5)
        True
    """
    ws = _weights(weights)
    d = act_absmax.shape[-1]
    if act_absmax.dim() != 1 or any(w.dim() != 2 or w.shape[1] != d for w in ws) or not ws:
        raise ShapeError(f"smoothquant_scales: act_absmax must be [d] and every weight [N, d]; got "
                         f"{tuple(act_absmax.shape)} and {[tuple(w.shape) for w in ws]}")
    if not torch.isfinite(act_absmax).all():
        raise CalibrationError("smoothquant_scales: activation statistics contain NaN/Inf; check the calibration data.")
    w_max = torch.stack([w.detach().abs().amax(0) for w in ws]).amax(0).to(act_absmax.dtype).clamp_min(_CLAMP)
    scales = fill_silent_channels(act_absmax).clamp_min(_CLAMP).pow(alpha) / w_max.pow(1 - alpha)
    return scales.clamp_min(_CLAMP)


def fill_silent_channels(act_absmax: Tensor, floor: float = 1e-3) -> Tensor:
    """A per-channel activation range (max or mean |x|) with the channels calibration saw (almost) silent set to
    the median of the others: SmoothQuant, DuQuant, SVD·Hadamard and AWQ divide x by a power of it."""
    silent = act_absmax < floor * act_absmax.max()
    if not silent.any() or silent.all():
        return act_absmax
    return torch.where(silent, act_absmax[~silent].median(), act_absmax)
