"""Rewrite the other spellings of a linear layer into aten.linear, so every later pass sees one op.

Before: a product with a weight made from parameters only (get_attr, or slices / transposes of them):
        `addmm(b, x, W)` (GPT-2's Conv1D: W is [in, out]), `mm(x, W)`, `matmul(x, W)` (`x @ self.w.t()`), a
        two-operand einsum with one weight of any rank (JAX ports: `einsum("BTD,NDH->BTNH", x, W)`), or experts
        stacked in one weight, `bmm(x, W)` with x [E, M, K] and W [E, K, N] (GPT-OSS).
After:  `linear(x, Wᵀ, b)`; a Wᵀ that is `t(P)` reads P itself, any other is `t(W)`, which fold_computed_weights
        then turns into a buffer. An einsum becomes permute / flatten of x, `linear` with W permuted and reshaped to
        [features, contracted], then unflatten / permute to the equation's output; stacked experts become one linear
        per expert (W[e]ᵀ folded to a buffer) and a stack. A product whose second operand depends on a graph input
        (attention's q·kᵀ) is left alone, and so is a product of two constants (no graph input upstream of x: HF's
        RoPE `inv_freq @ positions`), as are addmm with beta / alpha other than 1, other weight ranks and
        einsums that are not a linear map of x (a weight letter summed away, a batch letter shared with the weight,
        a diagonal).
Invariant: the same function; values agree up to the GEMM's rounding (linear may call BLAS on a transposed copy).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from qvla_compiler.passes import _graph as g

# Patterns are data: op → (position of x, of the [in, out] weight, of the bias or None)
LINEAR_SPELLINGS = {
    g.aten.addmm.default: (1, 2, 0),
    g.aten.mm.default: (0, 1, None),
    g.aten.matmul.default: (0, 1, None),
}
# x [E, M, K] times a weight stacked per expert [E, K, N] (GPT-OSS's experts): one linear per expert, stacked
BATCHED_SPELLINGS = frozenset({g.aten.bmm.default, g.aten.matmul.default})


def canonicalize_linears(gm: fx.GraphModule) -> fx.GraphModule:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == g.aten.einsum.default:
            changed |= _einsum_as_linear(gm, node)
            continue
        if node.op == "call_function" and node.target in BATCHED_SPELLINGS and _is_weight(node.args[1], dims=3) \
                and _reads_input(node.args[0]):
            changed |= _experts_as_linears(gm, node)
            continue
        spelling = LINEAR_SPELLINGS.get(node.target) if node.op == "call_function" else None
        if spelling is None or node.kwargs or not _is_weight(node.args[spelling[1]]) \
                or not _reads_input(node.args[spelling[0]]):
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
    _warn_float_products(gm)
    return gm


class FloatProductWarning(UserWarning):
    """A product with a parameter that is not a linear of x (an einsum summing a weight letter away, a weight indexed
    by an input, a custom op such as grouped MoE experts): it stays float."""


def _warn_float_products(gm: fx.GraphModule) -> None:
    products = [(n, operands) for n in gm.graph.nodes if (operands := _product_operands(n))]
    left = [f"{n.target.__name__}({name})" for n, operands in products if not _is_weight(n, dims=None)
            for w in operands if (name := _parameter_operand(w))]  # a product of weights is a weight: no warning
    if left:
        g.warn(gm, f"qvla: {len(left)} product(s) with a parameter are not linear layers and stay float: "
                   f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}. Write them as nn.Linear / F.linear to "
                   "quantize them.", FloatProductWarning)


def _product_operands(node: fx.Node) -> tuple:
    """What a product reads: a matmul's two operands, or every tensor argument of an op qvla cannot see into
    (a custom op, e.g. transformers' `grouped_mm_fallback` for MoE experts, or aten._grouped_mm)."""
    if (operands := g.matmul_operands(node)) is not None:
        return operands
    opaque = node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and (
        node.target == g.aten._grouped_mm.default or node.target.namespace not in ("aten", "prims"))
    return tuple(node.all_input_nodes) if opaque else ()


_GATHERS = frozenset({g.aten.index.Tensor, g.aten.embedding.default})  # rows of a parameter picked by an input


def _parameter_operand(node) -> str | None:
    """A product's operand that is a weight: computed from parameters only (its name), or a parameter indexed by a
    graph input (`W[index]`: GR00T's per-embodiment weights, or an nn.Embedding row viewed as a matrix: X-VLA's
    per-domain linears), which stays float as a linear's would."""
    if _is_weight(node, dims=None):  # named by the first parameter it is computed from (fx nodes order by position)
        params = [n for n in g.ancestors(node) if _is_parameter(n)]  # buffers (RoPE's inv_freq) are not weights
        return min(params).target if params else None
    indexed = False
    while node.op == "call_function" and (node.target in g.LAYOUT_OPS or node.target in _GATHERS) \
            and isinstance(node.args[0], fx.Node):
        indexed, node = indexed or node.target in _GATHERS, node.args[0]
    return f"{node.target}[index]" if indexed and _is_parameter(node) and node.meta["val"].dim() >= 2 else None


def _is_parameter(node: fx.Node) -> bool:
    owner, _, name = node.target.rpartition(".") if node.op == "get_attr" else ("", "", "")
    return bool(name) and isinstance(getattr(node.graph.owning_module.get_submodule(owner), name, None), nn.Parameter)


def _is_weight(node, dims: int | None = 2) -> bool:
    """A `dims`-D (None: any rank) tensor computed from parameters only: no graph input upstream, and at least one
    parameter or buffer (a tensor made by arange / full alone, e.g. RoPE's positions, is not a weight)."""
    shape = getattr(node.meta.get("val"), "shape", None) if isinstance(node, fx.Node) else None
    if shape is None or dims is not None and len(shape) != dims:
        return False
    ops = {n.op for n in g.ancestors(node)}
    return "get_attr" in ops and ops <= {"get_attr", "call_function"}


def _reads_input(node) -> bool:
    """x of a linear depends on a graph input; a product of two constants (HF RoPE's `inv_freq @ positions`, a merged
    low-rank `A @ B`) is not a layer."""
    return isinstance(node, fx.Node) and any(n.op == "placeholder" for n in g.data_ancestors(node))


def _einsum_as_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Rewrite `einsum(eq, [x, W])` (either order) as a linear when it is one; False (untouched) otherwise."""
    operands = node.args[1]
    if len(operands) != 2 or node.kwargs or len(node.args) > 2 or "->" not in node.args[0]:
        return False
    weights = [_is_weight(o, dims=None) for o in operands]
    if weights.count(True) != 1:
        return False
    xi = weights.index(False)
    x, w = operands[xi], operands[1 - xi]
    if not _reads_input(x):
        return False
    specs, out = node.args[0].replace(" ", "").split("->")
    xs, ws = specs.split(",")[xi], specs.split(",")[1 - xi]
    xs, out = _expand_ellipsis(xs, out, x.meta["val"].dim(), unused=set(specs + out))
    letters = _linear_letters(xs, ws, out)
    if letters is None:
        return False
    batch, contracted, features = letters
    w_shape = dict(zip(ws, w.meta["val"].shape))
    with gm.graph.inserting_before(node):
        xp = _permuted(gm, x, [xs.index(c) for c in batch + contracted])
        if len(contracted) > 1:
            xp = g.call(gm, g.aten.flatten.using_ints, xp, len(batch), -1)
        wp = _permuted(gm, w, [ws.index(c) for c in features + contracted])
        sizes = [math.prod(int(w_shape[c]) for c in letters) for letters in (features, contracted)]
        wp = g.call(gm, g.aten.reshape.default, wp, sizes)
        y = g.call(gm, g.aten.linear.default, xp, wp)
        y.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        if len(features) > 1:
            y = g.call(gm, g.aten.unflatten.int, y, -1, [w_shape[c] for c in features])
        y = _permuted(gm, y, [(batch + features).index(c) for c in out])
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)
    return True


def _experts_as_linears(gm: fx.GraphModule, node: fx.Node) -> bool:
    """`bmm(x, W)` with x [E, M, K] and a weight W [E, K, N] as stack([linear(x[e], W[e]ᵀ) for e]); False otherwise."""
    x, w = node.args[:2]
    experts, leading = w.meta["val"].shape[0], x.meta["val"].shape[0]
    if node.kwargs or x.meta["val"].dim() != 3 or not (isinstance(leading, int) and leading == experts):
        return False  # x broadcast against the stack, or its leading size is not (statically) the experts'
    with gm.graph.inserting_before(node):
        outs = []
        for e in range(experts):
            weight = g.call(gm, g.aten.t.default, g.call(gm, g.aten.select.int, w, 0, e))
            outs.append(g.call(gm, g.aten.linear.default, g.call(gm, g.aten.select.int, x, 0, e), weight))
            outs[-1].meta.update({k: v for k, v in node.meta.items() if k != "val"})
        y = g.call(gm, g.aten.stack.default, outs)
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)
    return True


def _expand_ellipsis(xs: str, out: str, ndim: int, unused: set[str]) -> tuple[str, str]:
    """x's "..." (and the output's) spelled as fresh letters, one per dimension it stands for."""
    if "..." not in xs:
        return xs, out
    fresh = "".join(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in unused)
    span = fresh[:ndim - (len(xs) - 3)]
    return xs.replace("...", span), out.replace("...", span)


def _linear_letters(xs: str, ws: str, out: str) -> tuple[list[str], list[str], list[str]] | None:
    """(batch letters of x, contracted letters, feature letters of W) when `xs,ws->out` is a linear map of x."""
    if "." in xs + ws + out or any(len(set(s)) != len(s) for s in (xs, ws, out)):
        return None  # an ellipsis on the weight or in the output only, or a diagonal
    batch = [c for c in xs if c not in ws]
    contracted = [c for c in xs if c in ws and c not in out]
    features = [c for c in ws if c not in xs]
    shared = [c for c in xs if c in ws and c in out]
    if shared or not contracted or not features or set(out) != set(batch + features):
        return None
    return batch, contracted, features


def _permuted(gm: fx.GraphModule, x: fx.Node, dims: list[int]) -> fx.Node:
    return x if dims == sorted(dims) else g.call(gm, g.aten.permute.default, x, dims)
