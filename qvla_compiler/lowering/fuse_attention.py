"""Explicit softmax attention → one `scaled_dot_product_attention`, in the graphs the compile paths hand to Inductor.

Before (fp32; pi05 and openpi write attention this way, LeRobot 0.6.1's π0 / π0.5 as transformers' eager attention):
    s = matmul(q, transpose(k, -2, -1)) · c                   (c a float; or / d; or matmul(q, kt) with kt the
                                                              keys already transposed: SmolVLA's cached keys)
    s = masked_fill(s, ~m, f)  |  masked_fill(s, n, f)  |  where(m, [to fp32](s), f)  |  s + where(m, 0, f)
    p = softmax([to fp32](s), -1);  o = matmul([type_as / to](p), v)
After:
    o = scaled_dot_product_attention(q, k, v, attn_mask=where(m, 0, f), scale=c)
Invariant: the same scores and weights in exact arithmetic. Only a finite fill f ≤ -1e30 is taken: then s + f
rounds to f for every finite score, so a kept score is unchanged, a masked one is f as before, and a fully masked
row stays uniform as in the original. Only fp32 q, k, v (the casts are no-ops) with matching batch dims; every
intermediate must feed the next step alone. Anything else is left as it is.
Why: Inductor's own attention patterns miss this form, and its bool-mask softmax is slow on CPU; at pi05-small's
shapes the rewrite takes the compiled prefix to 0.92× and the step to 0.95× (RESULTS §1g). The saved program keeps
the original ops; the compile paths rewrite the copy they compile (`lowering.inductor_forms`).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qvla_compiler.passes._graph import call, noop_cast, real_users, rewrite_each

aten = torch.ops.aten
SCALES = {aten.mul.Tensor: lambda c: c, aten.div.Tensor: lambda c: 1.0 / c}  # scores c·s or s/d: scale c or 1/d
FILL_AT_MOST = -1e30


def fuse_attention(gm: fx.GraphModule) -> int:
    """Rewrite every match in place; returns how many."""
    return rewrite_each(gm, _matches(gm), _rewrite)


def _matches(gm: fx.GraphModule) -> list[tuple]:
    return [m for m in map(_match, gm.graph.find_nodes(op="call_function", target=aten.softmax.int)) if m]


def _match(softmax: fx.Node):
    """(q, k, v, additive-mask recipe, scale, the final matmul) or None; reads the graph, changes nothing."""
    if softmax.args[1] not in (-1, _rank(softmax) - 1) or softmax.meta["val"].dtype != torch.float32:
        return None  # softmax(s, -1, dtype=bf16) computes in bf16 even on fp32 scores
    masked = _casts_back(softmax.args[0])
    found = _masking(masked) if _sole(masked) else None
    if found is None:
        return None
    scores, cond, keep, fill = found
    scores = _casts_back(scores)  # SmolVLA: where(m, to(s, fp32), f)
    if scores.target not in SCALES or not _sole(scores):
        return None
    qk, c = scores.args
    if (not isinstance(fill, float) or not -float("inf") < fill <= FILL_AT_MOST or not isinstance(c, (int, float))
            or qk.target is not aten.matmul.default or not _sole(qk)):
        return None
    q, kt = qk.args
    probs = _casts_forward(softmax)
    out = real_users(probs)[0] if len(real_users(probs)) == 1 else None
    if out is None or out.target is not aten.matmul.default or out.args[0] is not probs:
        return None
    v = out.args[1]
    if not _fp32_same_batch(*(_val(n) for n in (q, kt, v, cond))):
        return None
    mask = (cond, 0.0, fill) if keep else (cond, fill, 0.0)  # where(cond, a, b): 0 on kept scores, f on dropped
    return q, kt, v, mask, SCALES[scores.target](float(c)), out


def _masking(masked: fx.Node):
    """(scores, cond, whether cond marks the kept scores, fill) of a masking node, or None."""
    if masked.target is aten.masked_fill.Scalar:
        scores, cond, fill = masked.args
        keep = cond.target is aten.bitwise_not.default
        return scores, cond.args[0] if keep else cond, keep, fill
    if masked.target is aten.where.ScalarOther:
        cond, scores, fill = masked.args
        return scores, cond, True, fill
    if masked.target is aten.add.Tensor:  # transformers' eager attention: s + where(m, 0, f)
        additive = [a for a in masked.args if isinstance(a, fx.Node) and a.target is aten.where.Scalar]
        if len(additive) != 1 or masked.kwargs.get("alpha", 1) != 1 or 0.0 not in additive[0].args[1:]:
            return None  # add(s, w, alpha=a) adds a·w: another fill, or a sign flipped
        cond, kept, dropped = additive[0].args
        scores = masked.args[1] if masked.args[0] is additive[0] else masked.args[0]
        return scores, cond, kept == 0.0, dropped if kept == 0.0 else kept
    return None


def _rewrite(gm: fx.GraphModule, q, kt, v, mask, scale, out) -> None:
    with gm.graph.inserting_before(out):  # shapes recorded: later rewrites (fold_shared_kv) read them
        k = kt.args[0] if _swaps_last_two(kt) else call(gm, aten.transpose.int, kt, -2, -1)  # a view either way
        additive = call(gm, aten.where.Scalar, *mask)
        fused = call(gm, aten.scaled_dot_product_attention.default, q, k, v, attn_mask=additive, scale=scale)
    out.replace_all_uses_with(fused)


def _casts_back(node: fx.Node) -> fx.Node:
    while _fp32_cast(node) and len(real_users(node)) == 1:
        node = node.args[0]
    return node


def _casts_forward(node: fx.Node) -> fx.Node:
    while len(real_users(node)) == 1 and _fp32_cast(real_users(node)[0]):
        node = real_users(node)[0]
    return node


def _fp32_cast(node: fx.Node) -> bool:  # a cast to another dtype would change what the softmax computes
    return noop_cast(node) and node.meta["val"].dtype == torch.float32


def _sole(node: fx.Node) -> bool:
    return len(real_users(node)) == 1


def _rank(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _swaps_last_two(node: fx.Node) -> bool:
    return node.target is aten.transpose.int and sorted(d % _rank(node) for d in node.args[1:]) == [2, 3]


def _val(node) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _fp32_same_batch(q, kt, v, cond) -> bool:
    """q [B, H, L, D], the scores' right operand kt [B, H, D, S] and v [B, H, S, D], all fp32; a bool mask."""
    if any(not isinstance(t, torch.Tensor) for t in (q, kt, v, cond)) or cond.dtype != torch.bool:
        return False
    if not all(t.dtype == torch.float32 and t.dim() == 4 for t in (q, kt, v)):
        return False
    same = [(q.shape[i], kt.shape[i]) for i in (0, 1)] + [(kt.shape[i], v.shape[i]) for i in (0, 1)]
    return all(statically_known_true(a == b) for a, b in [*same, (kt.shape[3], v.shape[2])])
