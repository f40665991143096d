"""DuQuant (quantvla.md §9) per integer-linear input: smoothing, block rotation, zigzag permutation, rotation.

Before: x → obs → {linears W_i} for groups annotated "duquant" (q/k/v share one group, gate/up another).
After:  x → qvla::block_rotate(x, diag(1/Λ)·R₁, P, R₂) → obs → {linears ((W_i·Λ) R₁) P R₂}: Λ, R₁, P, R₂ fitted by
        calibrate_duquant on the observer's token sample; the smoothing 1/Λ is folded into the rows of R₁'s blocks,
        so the whole activation transform is that one op. Weights are replaced before quantize_linears.
Invariant: exact in real arithmetic (R₁, R₂ orthogonal, P a permutation, Λ·Λ⁻¹ = I); the only new nodes are
        qvla::block_rotate (transparent to check_schedule).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qvla_compiler.quant.duquant import calibrate_duquant
from qvla_compiler.passes.rotate_common import group_rotation, insert_online, observed_groups, replace_weight, weight_of

BLOCK_ROTATE = torch.ops.qvla.block_rotate.default
GREEDY_STEPS = 64  # greedy rotation steps per block (the reference's 256 buys little on a few hundred tokens)


def rotate_duquant(gm: fx.GraphModule, block: int = 128, alpha: float | None = 0.6,
                   steps: int = GREEDY_STEPS) -> fx.GraphModule:
    """Fit and apply a DuQuant transform to every group annotated "duquant"; `alpha=None` disables smoothing."""
    for obs_node, obs, linears in observed_groups(gm):
        if "duquant" not in group_rotation(linears).split("+"):
            continue
        obs.require_data()
        weights = [weight_of(gm, lin).double() for lin in linears]
        t = calibrate_duquant(obs.sample, weights, block=block, steps=steps, alpha=alpha)
        rot1 = t.rot1
        if t.smooth is not None:  # (x/Λ)·R₁ = x·(diag(1/Λ)·R₁): scale the rows of every block
            rot1 = rot1 / t.smooth.reshape(rot1.shape[0], rot1.shape[1], 1)
        insert_online(gm, obs_node, BLOCK_ROTATE, {"rot": rot1, "perm": t.perm, "rot2": t.rot2})
        for lin, w in zip(linears, weights):
            # W' = ((W·Λ)R₁)PR₂, x' = ((x/Λ)R₁)PR₂  ⇒  x'W'ᵀ = x Λ⁻¹ (R₁PR₂)(R₁PR₂)ᵀ Λ Wᵀ = xWᵀ
            replace_weight(gm, lin, t.apply_to_weight(w))
        obs.sample = t.apply_to_activation(obs.sample.double()).float()
    gm.graph.lint()
    gm.recompile()
    return gm
