"""QuaRot-style Hadamard rotation of integer linears' inputs (quantvla.md §10), as online/offline pairs.

Before: x → obs → {linears W_i} for groups annotated "hadamard" (width n = m·2^k, see hadamard.supported_width).
After:  x → qvla::hadamard(x, H_m, 1/√n) → obs → {linears W_i·Hᵀ}: one online op per group (before the MLP down
        projection, before o_proj across all heads at once, before q/k/v and gate/up), the inverse folded into the
        weights so quantize_linears quantizes W·Hᵀ. Each group's rotation stays local to its own input; QuaRot's
        residual-stream rotation R1 (no online op for the norm-fed inputs) is rotation="quarot", rotate_residual.py.
        The per-head fold into v_proj (R2) is not done.
Invariant: exact in real arithmetic (H orthonormal); the only new nodes are qvla::hadamard (transparent to
        check_schedule).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from qvla_compiler.quant.hadamard import fast_hadamard, hadamard_base, hadamard_factors
from qvla_compiler.passes.rotate_common import group_rotation, insert_online, observed_groups, replace_weight, weight_of

HADAMARD = torch.ops.qvla.hadamard.default


def rotate_hadamard(gm: fx.GraphModule) -> fx.GraphModule:
    """Rotate every group annotated "hadamard"; see the module docstring."""
    for obs_node, _, linears in observed_groups(gm):
        if "hadamard" not in group_rotation(linears).split("+"):
            continue
        n = linears[0].meta["qvla"].in_features
        m, _ = hadamard_factors(n)
        had_m = hadamard_base(m) if m > 1 else None
        insert_online(gm, obs_node, HADAMARD, {"had_m": had_m}, 1.0 / math.sqrt(n), 1)
        for lin in linears:
            # W' = W·Hᵀ, x' = x·Hᵀ  ⇒  x'W'ᵀ = x·HᵀH·Wᵀ = xWᵀ
            replace_weight(gm, lin, lambda: fast_hadamard(weight_of(gm, lin).double(), dim=-1))
    gm.graph.lint()
    gm.recompile()
    return gm
