"""Fold ATM/OHB scalars into the projections that produce them.

Before: q = linear(x, W_q, b_q) … attention …; z = linear(a, W_o, b_o); (conceptually q·α_h and z·β)
After:  rows [h·d, (h+1)·d) of W_q and b_q scaled by α_h (or, for an integer q_proj, those rows of its dequant scale
        `_ws`, and its float bias); W_o, b_o (or o_proj's `_ws` and bias) scaled by β. When a per-head q-norm sits
        between q_proj and the core (it would cancel a scale on q_proj), α goes into the norm's weight instead, which
        becomes [H, 1, d] (or [H, d]) so it broadcasts per head. No node is added, removed or rewired.
Why:    RoPE, head splits and GQA/MQA repeats are linear in q, so α on q's rows is α on that head's logits; β is a
        scalar on a linear output. Tensors are cloned before scaling: they may share storage with the user's policy.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from qvla_compiler.meta import update
from qvla_compiler.kernels.ops import QVLA_LINEAR_NAMES
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes._attention_sites import AttentionSite, attention_sites

_NORM_OPS = frozenset({g.aten.rsqrt.default, g.aten.linalg_vector_norm.default, g.aten.norm.ScalarOpt_dim})
_FUSED_NORM_OPS = frozenset({g.aten.rms_norm.default, g.aten.layer_norm.default, g.aten.native_layer_norm.default,
                             g.aten.group_norm.default})
_CASTS = frozenset({g.aten.to.dtype, g.aten._to_copy.default, g.aten.type_as.default, g.aten.clone.default,
                    g.aten.detach.default, g.aten.alias.default})
_QVLA_LINEARS = QVLA_LINEAR_NAMES


@dataclasses.dataclass(frozen=True)
class AlphaTarget:
    """Where a site's per-head α lands: the q projection(s), or the weight multiply of a q-norm."""

    kind: str  # "linear" or "norm"
    nodes: tuple[fx.Node, ...]  # the q linears, or (norm weight mul, weight get_attr)
    offset: float = 0.0  # norm weight enters as (w + offset), e.g. Gemma's 1 + w
    head_axis: int = -3  # axis of the heads in the norm multiply's output


def alpha_target(gm: fx.GraphModule, site: AttentionSite) -> AlphaTarget | str:
    """Decide where α of `site` folds; a string says why it cannot (α must then stay 1)."""
    if not site.q_linears or site.heads is None:
        return "no query projection found"
    if site.fused_qkv:
        return "fused qkv projection: q rows are not identified"
    path = set().union(*(_between(q, site.core.q) for q in site.q_linears))
    ordered = [n for n in gm.graph.nodes if n in path]
    if any(n.op == "call_function" and n.target in _FUSED_NORM_OPS for n in ordered):
        return "a fused norm op follows q_proj: its [head_dim] weight cannot take a per-head α"
    norm = next((n for n in ordered if n.op == "call_function" and n.target in _NORM_OPS), None)
    if norm is None:
        return AlphaTarget("linear", site.q_linears)
    for n in ordered[ordered.index(norm) + 1:]:
        if n.target is not g.aten.mul.Tensor:
            continue
        other = next((a for a in n.args if isinstance(a, fx.Node) and a not in path), None)
        chain = _weight_chain(other) if other is not None else None
        if chain is None:
            continue
        attr, offset = chain
        axis = _head_axis(n, site)
        if axis is None:
            return "q-norm output layout is ambiguous: cannot tell the head axis"
        return AlphaTarget("norm", (n, attr), offset, axis)
    return "a q-norm without an affine weight follows q_proj"


def fold_attention_scales(gm: fx.GraphModule, alphas: dict[int, list[float]], betas: dict[int, float]) -> fx.GraphModule:
    """Fold α (per block, per query head) and β (per block) into `gm`'s tensors; the graph is not touched."""
    sites = {s.block: s for s in attention_sites(gm)}
    for block, alpha in alphas.items():
        site = sites[block]
        target = alpha_target(gm, site)
        if isinstance(target, str):
            if any(abs(a - 1.0) > 0 for a in alpha):
                raise ValueError(f"cannot fold ATM α into attention block {block}: {target}")
            continue
        a = torch.tensor(alpha, dtype=torch.float64)
        if target.kind == "linear":
            for q in target.nodes:
                _scale_outputs(gm, q, a.repeat_interleave(site.head_dim))
        else:
            _scale_norm_weight(gm, target, a)
    for block, beta in betas.items():
        for o in sites[block].o_linears:
            _scale_outputs(gm, o, torch.full((o.meta["qvla"].out_features,), float(beta), dtype=torch.float64))
    gm.recompile()
    return gm


def _between(start: fx.Node, end: fx.Node) -> set[fx.Node]:
    """Nodes on some path from `start` to `end` (both included)."""
    up, seen, stack = g.ancestors(end), set(), [start]
    while stack:
        node = stack.pop()
        if node in up and node not in seen:
            seen.add(node)
            stack.extend(node.users)
    return seen


def _weight_chain(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(get_attr, c) when `node` is (w + c) through casts only; None otherwise."""
    offset = 0.0
    while node.op == "call_function":
        if node.target in _CASTS:
            node = node.args[0]
        elif node.target is g.aten.add.Tensor and isinstance(node.args[0], fx.Node) and \
                isinstance(node.args[1], (int, float)) and node.kwargs.get("alpha", 1) == 1:
            offset += float(node.args[1])
            node = node.args[0]
        else:
            return None
    return (node, offset) if node.op == "get_attr" else None


def _head_axis(mul: fx.Node, site: AttentionSite) -> int | None:
    shape = tuple(mul.meta["val"].shape) if "val" in mul.meta else ()
    if len(shape) < 3 or shape[-1] != site.head_dim:
        return None
    hits = [axis for axis in (-3, -2) if shape[axis] == site.heads]
    return hits[0] if len(hits) == 1 else None


def _scale_norm_weight(gm: fx.GraphModule, target: AlphaTarget, alpha: torch.Tensor) -> None:
    _, attr = target.nodes
    w = g.attr_tensor(gm, attr.target)
    c = target.offset
    per_head = alpha.reshape(-1, *([1] * (-target.head_axis - 1)))  # [H, 1, 1] broadcast against [H, T, d] or [H, d]
    new = (per_head * (w.detach().double() + c) - c).to(w.dtype)  # (w' + c) = α_h (w + c)
    g.replace_attr_tensor(gm, attr.target, new)


def _scale_outputs(gm: fx.GraphModule, node: fx.Node, factors: torch.Tensor) -> None:
    """Scale a linear's outputs channel-wise: float W/b, or the dequant scale and bias of an integer linear."""
    lowered = str(node.target).startswith(_QVLA_LINEARS)
    tensors = node.meta.get("qvla_tensors")
    if lowered:
        _scale_rows(gm, node.args[3].target, factors)
        bias = node.args[4]
    else:
        _scale_rows(gm, node.args[1].target, factors)
        if tensors is not None:  # quantized, not lowered yet: its dequant scale is already a buffer
            _scale_rows(gm, tensors.weight_scale, factors)
        bias = node.args[2] if len(node.args) > 2 else None
    if isinstance(bias, fx.Node):
        _scale_rows(gm, bias.target, factors)
    info = node.meta["qvla"]
    if tensors is not None:
        old = torch.tensor(info.out_scale, dtype=torch.float64) if info.out_scale else torch.ones_like(factors)
        update(node, out_scale=tuple((old * factors).tolist()))


def _scale_rows(gm: fx.GraphModule, target: str, factors: torch.Tensor) -> None:
    t = g.attr_tensor(gm, target)
    shaped = factors.reshape(-1, *([1] * (t.dim() - 1)))
    g.replace_attr_tensor(gm, target, (t.detach().double() * shaped).to(t.dtype))
