"""GPTQ (Frantar et al. 2022): quantize a weight column by column and feed each column's rounding error into the
columns not yet quantized, so that the layer's output on the calibration inputs moves as little as possible.

Per output row w [K], with H = 2·XᵀX/n the (mean) Hessian of the squared output error ‖Xwᵀ − Xqᵀ‖²/n:

    min_q (w − q) H (w − q)ᵀ.

OBQ: quantizing column j to q_j and re-solving the not-yet-quantized columns F gives the update
    w_F ← w_F − (w_j − q_j) / [H_F⁻¹]_jj · [H_F⁻¹]_{j,F},   then H_F⁻¹ drops row and column j.
GPTQ reads every such row at once from the upper Cholesky factor U of H⁻¹ (U_{j,j:} = [H_F⁻¹]_{j,j:} / √[H_F⁻¹]_jj):
    e_j = (w_j − q_j) / U_jj,   w_{j:} ← w_{j:} − e_j · U_{j,j:},
applied column by column inside a block of columns and as one matmul (lazy batch) to the columns after the block.

The result has exactly the format of `quantizers.quantize_weight`, so `dequantize_weight` reproduces the chosen grid.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qvla_compiler.errors import CalibrationError, RecipeError, ShapeError
from qvla_compiler.kernels.ops import LOWERINGS, WEIGHT_BITS, qmax_for
from qvla_compiler.quant.quantizers import _scales, quantize_weight, stored_scale, weight_low

_DAMP_RETRIES = 4  # a non-positive-definite H is retried with damping ×10 each time, this many times in all


@dataclasses.dataclass(frozen=True)
class HessianFactor:
    """What GPTQ derives from an input Hessian alone, so weights reading the same input (q/k/v, gate/up, one weight
    at several widths) factorise it once: the dead inputs, the column order, U (UᵀU = (H + λI)⁻¹, in that order)
    and H + λI (for the scale refit). From `factor_hessian`."""

    dead: Tensor
    perm: Tensor
    u: Tensor
    damped: Tensor
    damp: float
    act_order: bool


def factor_hessian(hessian: Tensor, damp: float = 0.01, act_order: bool = False) -> HessianFactor:
    """Dead inputs (H_jj = 0: the channel was always zero in calibration) get H_jj = 1; λ = damp·mean(diag H) is
    added to the diagonal; with `act_order` the columns go in order of decreasing H_jj."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ShapeError(f"gptq_quantize: the Hessian must be square [K, K], got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise CalibrationError("gptq_quantize: the Hessian contains NaN/Inf; check the calibration data and that the "
                               "float model is finite on it")
    h = hessian.detach().to(torch.float64).clone()  # the caller's tensor is never modified
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1  # keeps H invertible; the weights there never met a nonzero input
    k = h.shape[0]
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k, device=h.device)
    u, lam = _inverse_cholesky(h[perm][:, perm], damp)
    h.diagonal().add_(lam)
    return HessianFactor(dead, perm, u, h, damp, act_order)


def gptq_quantize(w: Tensor, hessian: Tensor | HessianFactor, bits: int, group_size: int = 128, *,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False, clip: str = "absmax",
                  static_groups: bool = False, refit_scales: bool = False) -> tuple[Tensor, Tensor]:
    """W [N, K] and the input Hessian H [K, K] (2·XᵀX/n; any positive multiple gives the same result), or its
    `factor_hessian` (made with the same damp and act_order) -> (integer weight, scales), in the format of
    `quantize_weight(w, bits, group_size, clip)`:
    bits 8: int8 [N, K] and fp32 scales [N] (per output channel; group_size ignored);
    bits 4, 3, 2: packed integers and bf16 scales [N, G], one per group of `group_size` columns (-1: per row);
    the sweep rounds on the stored (bf16) group scales, and refitted scales are rounded to bf16 at the end.

    Dead inputs (H_jj = 0: the channel was always zero in calibration) get H_jj = 1 and W[:, j] = 0, and
    damp·mean(diag H) is added to the diagonal. Scales: int8 per row from W (absmax or `clip="mse"` search);
    int4 groups from the current, error-updated weights when the sweep reaches the group's first column
    (AutoGPTQ), or, with `static_groups` or `act_order` (columns in order of decreasing H_jj), static per-group
    scales from W chosen before the sweep, so that groups stay contiguous in the original column order.
    `refit_scales`: after the sweep, with the integers fixed, every row's scales are re-solved by least squares
    under the damped Hessian (min_s (w − Q s)(H + λI)(w − Q s)ᵀ, one G×G system per row; a row whose solution
    would flip a scale's sign keeps its scales), which never increases that objective.

    Example::

        >>> x, w = torch.randn(512, 64), torch.randn(32, 64)
        >>> q, s = gptq_quantize(w, 2 * x.T @ x / 512, bits=4, group_size=32)
        >>> q.shape, s.shape
        (torch.Size([32, 32]), torch.Size([32, 2]))
    """
    factor = hessian if isinstance(hessian, HessianFactor) else factor_hessian(hessian, damp, act_order)
    if (factor.damp, factor.act_order) != (damp, act_order):
        raise RecipeError(f"gptq_quantize: the factor was made with damp={factor.damp}, act_order={factor.act_order},"
                          f" not damp={damp}, act_order={act_order}")
    w = _checked(w, factor.u.shape[0], bits, clip)
    n, k = w.shape
    gs = k if bits == 8 or group_size <= 0 or group_size >= k else group_size  # as quantizers._grouped
    w[:, factor.dead] = 0
    perm = factor.perm
    if bits == 8 or act_order or static_groups:
        scales = _static_scales(w, bits, group_size, clip)
    else:
        scales = w.new_zeros(n, -(-k // gs))  # filled in as the sweep reaches each group
    groups = perm // gs if bits < 8 else torch.zeros_like(perm)
    codes = _sweep(w[:, perm], factor.u, scales, groups.tolist(), bits,
                   gs if bits < 8 and not (act_order or static_groups) else 0, clip, max(1, block_size))
    codes = codes[:, torch.argsort(perm)]
    if refit_scales:
        scales = _refit_scales(w, factor.damped, codes, scales, gs)
    if bits == 8:
        return codes.contiguous(), scales[:, 0].contiguous()
    return LOWERINGS[bits].pack(codes), stored_scale(scales, bits).contiguous()


def _checked(w: Tensor, k: int, bits: int, clip: str) -> Tensor:
    if bits not in WEIGHT_BITS:
        raise RecipeError(f"gptq_quantize: bits must be one of {WEIGHT_BITS}, got {bits}")
    if clip not in ("absmax", "mse"):
        raise RecipeError(f"gptq_quantize: clip must be 'absmax' or 'mse', got {clip!r}")
    if w.dim() != 2 or w.numel() == 0 or w.shape[1] != k:
        raise ShapeError(f"gptq_quantize: need W [N, K] (non-empty) and H [K, K]; got W {tuple(w.shape)} and "
                         f"H [{k}, {k}]")
    if not torch.isfinite(w).all():
        raise CalibrationError("gptq_quantize: the weight contains NaN/Inf; check that the float model is finite")
    return w.detach().float().clone()  # a clone: the caller's tensor is never modified


def _static_scales(w: Tensor, bits: int, group_size: int, clip: str) -> Tensor:
    """Scales of plain rounding of W (dead columns already zeroed), [N, G]; int8 as one group per row."""
    _, scale = quantize_weight(w, bits, group_size, clip)
    return scale.reshape(w.shape[0], -1).float()


def _inverse_cholesky(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """(U, λ): the upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹), λ = damp·mean(diag H), float64 for
    stability. Retries with λ ×10 when H + λI is not numerically positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal().mean()
    for attempt in range(_DAMP_RETRIES):
        lam = damp * 10 ** attempt * mean_diag
        # With J the order reversal, J(H + λI)J = L Lᵀ gives H + λI = R Rᵀ, R = J L J upper triangular, so
        # (H + λI)⁻¹ = UᵀU with U = R⁻¹ upper: the Cholesky factor of the inverse without forming the inverse.
        lower, info = torch.linalg.cholesky_ex((h + lam * eye).flip(0, 1))
        if info == 0:
            upper = torch.linalg.solve_triangular(lower.flip(0, 1), eye, upper=True)
            if torch.isfinite(upper).all():
                return upper, lam.item()
    raise CalibrationError(
        f"gptq_quantize: the Hessian is not positive definite even with damping {damp * 10 ** (_DAMP_RETRIES - 1):g}"
        f"·mean(diag H) (mean diag {mean_diag.item():.3g}); it should be 2·XᵀX/n of real inputs — check the "
        "calibration data, or pass a larger damp")


def _refit_scales(w: Tensor, h: Tensor, codes: Tensor, scales: Tensor, gs: int) -> Tensor:
    """Per row i, the scales s [G] minimising (w_i − Q_i s) H (w_i − Q_i s)ᵀ with Q_i [K, G] the row's integers
    spread over its groups: the normal equations (Q_iᵀ H Q_i) s = Q_iᵀ H w_i, float64. A tiny ridge towards the
    old scales (1e-9 of the mean diagonal) keeps an all-zero group's scale; a solution that flips a scale's sign
    (or is not finite) keeps the old scales of that row."""
    n, k = w.shape
    g = scales.shape[1]
    pad = g * gs - k
    q = torch.nn.functional.pad(codes.double(), (0, pad)).reshape(n, g, gs)
    hp = torch.nn.functional.pad(h, (0, pad, 0, pad))
    hw = (torch.nn.functional.pad(w.double(), (0, pad)) @ hp).reshape(n, g, gs)
    rhs = (q * hw).sum(-1)  # [N, G]
    lhs = w.new_empty(n, g, g, dtype=torch.float64)
    for a in range(g):  # row block a of Q H Qᵀ restricted to group pairs: N·gs·K flops each
        lhs[:, a] = ((q[:, a] @ hp[a * gs: (a + 1) * gs]).reshape(n, g, gs) * q).sum(-1)
    old = scales.double()
    ridge = 1e-9 * lhs.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-300)
    lhs = lhs + ridge[:, None, None] * torch.eye(g, dtype=lhs.dtype, device=lhs.device)
    new = torch.linalg.solve(lhs, (rhs + ridge[:, None] * old)[..., None])[..., 0]
    ok = (torch.isfinite(new) & (new * old > 0)).all(1, keepdim=True)
    return torch.where(ok, new, old).float()


def _sweep(w: Tensor, u: Tensor, scales: Tensor, groups: list[int], bits: int, dynamic_gs: int, clip: str,
           block_size: int) -> Tensor:
    """The GPTQ column loop over W [N, K], in blocks of `block_size` columns; returns the integer codes [N, K] int8.
    Column j uses scales[:, groups[j]]; with dynamic_gs > 0 that scale is computed from the current weights when
    j is a multiple of dynamic_gs. Works on Wᵀ (float64) so that each column is a contiguous row on the CPU."""
    qmax, low = qmax_for(bits), weight_low(bits)
    wt = w.T.contiguous().double()  # [K, N], updated in place
    k, n = wt.shape
    codes = torch.empty(k, n, dtype=torch.int8, device=wt.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        blk = wt[i1:i2]  # a view: the in-block updates land in wt
        err = wt.new_zeros(i2 - i1, n)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic_gs and j % dynamic_gs == 0:
                cur = _current_rows(wt, err, u, i1, i, i2, min(j + dynamic_gs, k))
                group_scale = _scales(cur.T.float()[:, None, :], qmax, clip, low=low)[:, 0]
                scales[:, groups[j]] = stored_scale(group_scale, bits).float()
            s = scales[:, groups[j]].double()
            q = torch.clamp(torch.round(blk[i] / s), low, qmax)
            codes[j] = q.to(torch.int8)
            err[i] = (blk[i] - q * s) / u[j, j]
            # OBQ update of the rest of the block; a [m, 1] @ [1, N] addmm, as BLAS is far faster than addr_ here
            blk[i + 1:].addmm_(u[j, j + 1: i2, None], err[i: i + 1], alpha=-1)
        wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1)  # lazy batch: the block's updates to every later column
    return codes.T


def _current_rows(wt: Tensor, err: Tensor, u: Tensor, i1: int, i: int, i2: int, end: int) -> Tensor:
    """Error-updated weights of columns [i1 + i, end) (rows of Wᵀ): inside the block they are current; past the
    block they still lack this block's pending lazy update from the i columns already quantized, so apply it."""
    if end <= i2:
        return wt[i1 + i: end]
    beyond = wt[i2:end] - u[i1: i1 + i, i2:end].T @ err[:i]
    return torch.cat([wt[i1 + i: i2], beyond], 0)
