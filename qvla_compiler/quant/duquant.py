"""Original DuQuant (Lin et al. 2024; quantvla.md §9): smoothing, greedy block rotation, zigzag permutation, rotation.

x ↦ x' = ((x / Λ) R₁) P R₂ with R₁, R₂ block-diagonal (nblocks blocks of B×B) and P a channel permutation; the
consumer weight becomes W' = ((W·Λ) R₁) P R₂ (same map with Λ multiplied in), so x'W'ᵀ = xWᵀ exactly:
M = Λ⁻¹R₁PR₂ and W' = W M⁻ᵀ = W Λ R₁ P R₂ because R₁, R₂ are orthogonal and P a permutation.

Choices, versus the reference code's quirks (§9.2):
* PER-BLOCK rotations: each block b runs its own greedy search on its own columns (the paper), instead of one B×B
  matrix shared by every block and driven by the global max (the code).
* The channel moved onto the spreading row is the IN-BLOCK COLUMN of the peak |x| (the code uses the row index of
  the reshaped matrix).
* The peak max(X_b) − min(X_b) is measured AFTER applying each step's rotation, and the product R_1⋯R_j with the lowest
  peak over j = 1..steps is kept (at least one step is always applied, as in the code).
* get_rot(B) = diag(1, Q′)·R_base (Q′ random orthogonal from `seed`): Q′ mixes the other channels first, so row 0 stays
  exactly (1/√B)·1 and a spike is spread uniformly; R_base·diag(1, Q′) would spread it unevenly.
* Widths not divisible by `block`: the block size used is the largest divisor of d that is ≤ `block` (96 → 96,
  384 → 128, 1536 → 128); no padding, so the transformed width always equals d. For awkward d (e.g. 2·prime) this
  degrades to small blocks; pass a divisor explicitly if that matters.

Cost: the search is O(steps·T·d·B) on the calibration tokens [T, d]; the reference runs it on the mean sequence over
samples, so pass a few hundred representative tokens, not every calibration token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qvla_compiler.errors import CalibrationError, ShapeError
from qvla_compiler.quant.smoothquant import activation_absmax, smoothquant_scales


def _blockwise(x: Tensor, rot: Tensor) -> Tensor:
    nb, b, _ = rot.shape
    y = torch.bmm(x.reshape(-1, nb, b).transpose(0, 1), rot.to(x.dtype))
    return y.transpose(0, 1).reshape(x.shape)


@dataclass(frozen=True, eq=False)
class DuQuantTransform:
    """x' = ((x / smooth) R₁)[..., perm] R₂ blockwise; rot1/rot2 are [nblocks, B, B] float64, perm a gather index.

    perm and rot2 may be None (not applied): the SVD·Hadamard rotation (quant/svd_hadamard.py) is Λ and R₁ only."""

    smooth: Tensor | None
    rot1: Tensor
    perm: Tensor | None
    rot2: Tensor | None

    @property
    def block(self) -> int:
        return self.rot1.shape[-1]

    def _apply(self, x: Tensor, smooth_op) -> Tensor:
        if self.smooth is not None:
            x = smooth_op(x, self.smooth.to(x.dtype))
        x = _blockwise(x, self.rot1)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return x if self.rot2 is None else _blockwise(x, self.rot2)

    def apply_to_activation(self, x: Tensor) -> Tensor:
        """x [..., d] ↦ ((x / Λ) R₁) P R₂."""
        return self._apply(x, torch.div)

    def apply_to_weight(self, weight: Tensor) -> Tensor:
        """W [N, d] ↦ ((W·Λ) R₁) P R₂, so apply_to_activation(x) @ apply_to_weight(W).T == x @ W.T."""
        return self._apply(weight, torch.mul)

    def invert_activation(self, y: Tensor) -> Tensor:
        """Inverse of apply_to_activation: y R₂ᵀ Pᵀ R₁ᵀ · Λ."""
        z = y if self.rot2 is None else _blockwise(y, self.rot2.transpose(1, 2))
        if self.perm is not None:
            z = torch.zeros_like(z).index_copy_(-1, self.perm, z)
        z = _blockwise(z, self.rot1.transpose(1, 2))
        return z if self.smooth is None else z * self.smooth.to(z.dtype)

    def matrix(self) -> Tensor:
        """Dense M [d, d] (float64) with apply_to_activation(x) == x @ M."""
        return self.apply_to_activation(torch.eye(self.rot1.shape[0] * self.rot1.shape[1], dtype=torch.float64))


def duquant_base_rotation(b: int) -> Tensor:
    """Orthogonal B×B matrix whose row 0 is (1/√B)·1, built from B − 1 Givens rotations (Helmert-type).

    G_i rotates (i, i+1) with cos = 1/√(i+2), sin = √(i+1)/√(i+2); the product's last column is uniform, so the
    transpose with rows and columns 0 ↔ B−1 swapped has the uniform row first: a spike on channel 0 is spread evenly.
    """
    r = torch.eye(b, dtype=torch.float64)
    for i in range(b - 1):
        c, s = 1 / math.sqrt(i + 2), math.sqrt(i + 1) / math.sqrt(i + 2)
        rows = r[:, [i, i + 1]].clone()
        r[:, i], r[:, i + 1] = c * rows[:, 0] - s * rows[:, 1], s * rows[:, 0] + c * rows[:, 1]  # r ← r·G_i
    swap = list(range(b))
    swap[0], swap[-1] = b - 1, 0
    return r.T[swap][:, swap].contiguous()


def _random_orthogonal(n: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


def _get_rot(b: int, gen: torch.Generator) -> Tensor:
    mix = torch.eye(b, dtype=torch.float64)
    if b > 1:
        mix[1:, 1:] = _random_orthogonal(b - 1, gen)
    return mix @ duquant_base_rotation(b)


def _greedy_rotation(x: Tensor, rot: Tensor, steps: int) -> Tensor:
    """Per-block greedy search. x [nb, T, B] ↦ R [nb, B, B] (product of the best prefix of E_c·rot·E_c steps)."""
    nb, _, b = x.shape
    acc = torch.eye(b, dtype=x.dtype).expand(nb, b, b).contiguous()
    best, best_peak = acc.clone(), torch.full((nb,), math.inf, dtype=x.dtype)
    arange, blocks = torch.arange(b), torch.arange(nb)
    (hi, i_hi), (lo, i_lo) = x.reshape(nb, -1).max(1), x.reshape(nb, -1).min(1)
    for _ in range(steps):
        col = torch.where(hi.abs() >= lo.abs(), i_hi, i_lo) % b  # in-block column of the peak |x|
        swap = arange.expand(nb, b).clone()
        swap[blocks, col], swap[:, 0] = 0, col  # E_c: exchange channel 0 and c
        step = rot[swap[:, :, None], swap[:, None, :]]  # E_c·rot·E_c: the spreading row lands on channel c
        x, acc = torch.bmm(x, step), torch.bmm(acc, step)
        (hi, i_hi), (lo, i_lo) = x.reshape(nb, -1).max(1), x.reshape(nb, -1).min(1)
        better = hi - lo < best_peak
        best[better], best_peak[better] = acc[better], (hi - lo)[better]
    return best


def zigzag_permutation(score: Tensor, nblocks: int) -> Tensor:
    """Gather index: channels by descending score dealt to blocks 0..K−1, K−1..0, 0.. (§9.3), sorted per block."""
    order = torch.argsort(score, descending=True, stable=True)
    pos = torch.arange(score.numel())
    sweep, r = pos // nblocks, pos % nblocks
    block = torch.where(sweep % 2 == 0, r, nblocks - 1 - r)
    return order[torch.argsort(block, stable=True)]


def _largest_divisor(d: int, block: int) -> int:
    return max(k for k in range(1, min(block, d) + 1) if d % k == 0)


def calibrate_duquant(
    act_samples: Tensor,
    weight: Tensor | Sequence[Tensor],
    block: int = 128,
    steps: int = 256,
    alpha: float | None = 0.6,
    seed: int = 0,
) -> DuQuantTransform:
    """Fit a DuQuantTransform for one activation [T, d] (or [..., d]) and the weights [N_i, d] that consume it.

    alpha=None disables smoothing. Example::

        >>> x, w = torch.randn(64, 256, dtype=torch.float64), torch.randn(32, 256, dtype=torch.float64)
        >>> t = calibrate_duquant(x, w, block=64, steps=16)
        >>> torch.allclose(t.apply_to_activation(x) @ t.apply_to_weight(w).T, x @ w.T)
        True
    """
    x = act_samples.detach().reshape(-1, act_samples.shape[-1]).to(torch.float64)
    weights = [weight] if isinstance(weight, Tensor) else list(weight)
    d = x.shape[1]
    if x.shape[0] == 0 or not torch.isfinite(x).all():
        raise CalibrationError("calibrate_duquant: activation samples are empty or contain NaN/Inf.")
    if not weights or any(w.dim() != 2 or w.shape[1] != d for w in weights):
        raise ShapeError(f"calibrate_duquant: weights must be [N, {d}], got {[tuple(w.shape) for w in weights]}")
    smooth = None
    if alpha is not None:
        smooth = smoothquant_scales(activation_absmax(x), [w.to(torch.float64) for w in weights], alpha)
        x = x / smooth
    b = _largest_divisor(d, block)
    nb = d // b
    rot = _get_rot(b, torch.Generator().manual_seed(seed))
    rot1 = _greedy_rotation(x.reshape(-1, nb, b).transpose(0, 1), rot, steps)
    x = _blockwise(x, rot1)
    perm = zigzag_permutation(x.abs().amax(0), nb)
    x = x.index_select(-1, perm)
    rot2 = _greedy_rotation(x.reshape(-1, nb, b).transpose(0, 1), rot, steps)
    return DuQuantTransform(smooth=smooth, rot1=rot1, perm=perm, rot2=rot2)
