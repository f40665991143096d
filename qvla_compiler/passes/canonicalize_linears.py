"""Rewrite the other spellings of a linear layer into aten.linear, so every later pass sees one op.

Before: a product with a weight made from parameters only (get_attr, or slices / transposes of them):
        `addmm(b, x, W)` (GPT-2's Conv1D: W is [in, out]), `mm(x, W)`, `matmul(x, W)` (`x @ self.w.t()`).
After:  `linear(x, Wᵀ, b)`; a Wᵀ that is `t(P)` reads P itself, any other is `t(W)`, which fold_computed_weights
        then turns into a buffer. A product whose second operand depends on a graph input (attention's q·kᵀ) is
        left alone, as are addmm with beta / alpha other than 1 and weights that are not 2-D.
Invariant: the same function; values agree up to the GEMM's rounding (linear may call BLAS on a transposed copy).
"""
from __future__ import annotations

import torch.fx as fx

from qvla_compiler.passes import _graph as g

# Patterns are data: op → (position of x, of the [in, out] weight, of the bias or None)
LINEAR_SPELLINGS = {
    g.aten.addmm.default: (1, 2, 0),
    g.aten.mm.default: (0, 1, None),
    g.aten.matmul.default: (0, 1, None),
}


def canonicalize_linears(gm: fx.GraphModule) -> fx.GraphModule:
    changed = False
    for node in list(gm.graph.nodes):
        spelling = LINEAR_SPELLINGS.get(node.target) if node.op == "call_function" else None
        if spelling is None or node.kwargs or not _is_weight(node.args[spelling[1]]):
            continue
        x, w = node.args[spelling[0]], node.args[spelling[1]]
        bias = node.args[spelling[2]] if spelling[2] is not None else None
        if bias is not None and not _is_weight(bias, dims=1):
            continue
        with gm.graph.inserting_before(node):
            transposed = w.args[0] if w.target == g.aten.t.default else gm.graph.call_function(g.aten.t.default, (w,))
            linear = gm.graph.call_function(g.aten.linear.default, (x, transposed, bias))
        linear.meta.update(node.meta)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        if not w.users:  # the t(P) now read through
            gm.graph.erase_node(w)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _is_weight(node, dims: int = 2) -> bool:
    """A `dims`-D tensor computed from parameters only (no graph input upstream)."""
    if not isinstance(node, fx.Node) or len(getattr(node.meta.get("val"), "shape", ())) != dims:
        return False
    return all(n.op in ("get_attr", "call_function") for n in g.ancestors(node))
