"""DuQuant (quantvla.md §9) per integer-linear input: smoothing, block rotation, zigzag permutation, rotation.

Also the rewrite of "svd-hadamard" groups (quant/svd_hadamard.py): the same transform with R₁ = blockdiag(U_b·H_B)
and no P, R₂, so both rotations share fit_block_transforms and rotate_duquant(label=...).

Before: x → obs → {linears W_i} for groups annotated "duquant" (q/k/v share one group, gate/up another).
After:  x → qvla::block_rotate(x, diag(1/Λ)·R₁, P, R₂) → obs → {linears ((W_i·Λ) R₁) P R₂}: Λ, R₁, P, R₂ fitted by
        fit_duquant (calibrate_duquant on the observer's token sample, stored as GroupTransform.duquant); the
        smoothing 1/Λ is folded into the rows of R₁'s blocks, so the whole activation transform is that one op. Weights are replaced before quantize_linears.
Invariant: exact in real arithmetic (R₁, R₂ orthogonal, P a permutation, Λ·Λ⁻¹ = I); the only new nodes are
        qvla::block_rotate (transparent to check_schedule).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qvla_compiler.quant.duquant import calibrate_duquant
from qvla_compiler.passes.rotate_common import (TRANSFORM, group_rotation, group_transform, groups_to_fit,
                                               insert_online, observed_groups, replace_weight, set_group_transform,
                                               weight_of)

BLOCK_ROTATE = torch.ops.qvla.block_rotate.default
GREEDY_STEPS = 64  # greedy rotation steps per block (the reference's 256 buys little on a few hundred tokens)


def fit_duquant(gm: fx.GraphModule, block: int = 128, alpha: float | None = 0.6,
                steps: int = GREEDY_STEPS) -> fx.GraphModule:
    """Fit Λ, R₁, P, R₂ for every group annotated "duquant" (GroupTransform.duquant); `alpha=None`: no smoothing."""
    return fit_block_transforms(gm, "duquant", lambda x, ws: calibrate_duquant(x, ws, block=block, steps=steps,
                                                                                 alpha=alpha))


def fit_block_transforms(gm: fx.GraphModule, label: str, fit) -> fx.GraphModule:
    """GroupTransform.duquant = fit(activation sample, weights) for every group annotated `label`. A group also
    smoothed by SmoothQuant is fitted on what it will see: x/s and W·diag(s)."""
    for obs_node, obs, linears in groups_to_fit(gm):
        if label not in group_rotation(linears).split("+"):
            continue
        obs.require_data()
        s = obs_node.meta[TRANSFORM].smooth if TRANSFORM in obs_node.meta else None
        sample = obs.sample if s is None else (obs.sample / s).float()
        weights = [weight_of(gm, lin) for lin in linears]
        if s is not None:  # in the weights' dtype, as smooth_linears will store them
            weights = [(w.double() * s).to(w.dtype) for w in weights]
        set_group_transform(obs_node, duquant=fit(sample, [w.double() for w in weights]))
    return gm


def rotate_duquant(gm: fx.GraphModule, label: str = "duquant") -> fx.GraphModule:
    """Apply the fitted block transform of every group annotated `label`: one online op, the inverse folded into the
    weights ("svd-hadamard" groups carry the same kind of transform, without P and R₂)."""
    for obs_node, _, linears in observed_groups(gm):
        if label not in group_rotation(linears).split("+"):
            continue
        t = group_transform(obs_node, linears).duquant
        rot1 = t.rot1
        if t.smooth is not None:  # (x/Λ)·R₁ = x·(diag(1/Λ)·R₁): scale the rows of every block
            rot1 = rot1 / t.smooth.reshape(rot1.shape[0], rot1.shape[1], 1)
        insert_online(gm, obs_node, BLOCK_ROTATE, {"rot": rot1, "perm": t.perm, "rot2": t.rot2})
        for lin in linears:
            # W' = ((W·Λ)R₁)PR₂, x' = ((x/Λ)R₁)PR₂  ⇒  x'W'ᵀ = x Λ⁻¹ (R₁PR₂)(R₁PR₂)ᵀ Λ Wᵀ = xWᵀ
            replace_weight(gm, lin, lambda: t.apply_to_weight(weight_of(gm, lin).double()))
    gm.graph.lint()
    gm.recompile()
    return gm
