"""Composite SVD·Hadamard input rotation (Ω-QVLA, arXiv 2605.28803; quantvla.md §8): equalise, then diffuse.

Per block b of B input channels, R_b = U_b·H_B, where U_b holds the eigenvectors of Σ_i W_i[:, b]ᵀ W_i[:, b] (the
right singular vectors of the group's stacked weight columns, a PCA basis of the block) and H_B is the orthonormal
Hadamard matrix. With optional smoothing Λ first, as in DuQuant:

    x' = (x / Λ) · blockdiag(R_b),    W_i' = (W_i · Λ) · blockdiag(R_b),    so x'W_i'ᵀ = x W_iᵀ exactly.

Why both factors: U_b diagonalises the block's weight Gram matrix G_b, so Hᵀ(UᵀG_bU)H has the constant diagonal
trace(G_b)/B — every column of the rotated block carries exactly the same weight energy (proved in the test), which
is what a group-wise 4-bit weight scale wants; H_B then spreads any activation outlier the PCA basis concentrates
over all B channels of its block. The result is a DuQuantTransform with R₁ = blockdiag(R_b) and no permutation or
second rotation, so it runs as the existing qvla::block_rotate op and a plan stores it like DuQuant's.

Block size: the largest divisor of the width that is ≤ `block` and has a known Hadamard matrix (quant/hadamard.py);
set `block` ≥ the width for one full-width rotation (one dense K×K matmul online instead of K/B small ones).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qvla_compiler.errors import CalibrationError, ShapeError
from qvla_compiler.quant.duquant import DuQuantTransform
from qvla_compiler.quant.hadamard import hadamard_matrix, supported_width
from qvla_compiler.quant.smoothquant import activation_absmax, smoothquant_scales


def svd_hadamard_block(width: int, block: int) -> int:
    """The largest divisor of `width` that is ≤ `block` and a supported Hadamard order (1 always qualifies)."""
    return max(b for b in range(1, min(block, width) + 1) if width % b == 0 and supported_width(b))


def block_pca_bases(weights: Sequence[Tensor], b: int) -> Tensor:
    """[nb, B, B] float64: per block, the eigenvectors of the stacked weights' column Gram matrix (descending)."""
    d = weights[0].shape[1]
    cols = torch.cat([w.to(torch.float64) for w in weights]).reshape(-1, d // b, b).transpose(0, 1)  # [nb, N, B]
    _, vecs = torch.linalg.eigh(cols.transpose(1, 2) @ cols)
    return vecs.flip(-1).contiguous()


def calibrate_svd_hadamard(act_samples: Tensor, weight: Tensor | Sequence[Tensor], block: int = 128,
                           alpha: float | None = 0.5) -> DuQuantTransform:
    """Fit the composite rotation for one activation [..., d] and the weights [N_i, d] that consume it.

    alpha=None disables the smoothing Λ (then the activations are not needed beyond their width). Example::

        >>> x, w = torch.randn(64, 256, dtype=torch.float64), torch.randn(32, 256, dtype=torch.float64)
        >>> t = calibrate_svd_hadamard(x, w, block=64)
        >>> torch.allclose(t.apply_to_activation(x) @ t.apply_to_weight(w).T, x @ w.T)
        True
    """
    x = act_samples.detach().reshape(-1, act_samples.shape[-1]).to(torch.float64)
    weights = [w.detach().to(torch.float64) for w in ([weight] if isinstance(weight, Tensor) else weight)]
    d = x.shape[1]
    if not weights or any(w.dim() != 2 or w.shape[1] != d for w in weights):
        raise ShapeError(f"calibrate_svd_hadamard: weights must be [N, {d}], got {[tuple(w.shape) for w in weights]}")
    smooth = None
    if alpha is not None:
        if x.shape[0] == 0 or not torch.isfinite(x).all():
            raise CalibrationError("calibrate_svd_hadamard: activation samples are empty or contain NaN/Inf.")
        smooth = smoothquant_scales(activation_absmax(x), weights, alpha)
        weights = [w * smooth for w in weights]
    b = svd_hadamard_block(d, block)
    rot = block_pca_bases(weights, b) @ hadamard_matrix(b)
    return DuQuantTransform(smooth=smooth, rot1=rot, perm=None, rot2=None)
