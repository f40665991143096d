"""Attention whose keys and values are shared by groups of query heads (MQA, GQA) → attention over the shared heads
alone, each group's queries stacked as rows, in the graphs the compile paths hand to Inductor.

Before (q: B×H×L×D, k1 and v1: B×Hkv×S×D, g = H / Hkv; the mask, if any, the same for every head):
    k = expand(k1, [B, H, S, D])                                 (Hkv = 1: pi0.5's action expert, LeRobot's π0)
      | reshape([clone](expand(unsqueeze(k1, 2), [B, Hkv, g, S, D])), [B, H, S, D])   (transformers' repeat_kv)
      | repeat_interleave(k1, g, dim=1)                          (GR00T's backbone)
      | transpose(reshape(expand(unsqueeze(k0, 3), [B, S, Hkv, g, D]), [B, S, H, D]), 1, 2)
                                   (SmolVLA: repeat_kv on B×S×Hkv×D, then the heads moved second; k1 = k0ᵀ₁₂)
      | k1 itself, with enable_gqa=True
    v likewise;  o = scaled_dot_product_attention(q, k, v, attn_mask=m, scale=c)
After:
    o = reshape(scaled_dot_product_attention(reshape(q, [B, Hkv, g·L, D]), k1, v1, attn_mask=m', scale=c),
                [B, H, L, D]),    m' = m where m has one query row (or none), else repeat(m, [1, 1, g, 1])
Invariant: every query row meets the same keys, values, mask row and scale as before, so each output row is the same
weighted sum. Only non-causal attention without dropout, with the heads grouped as repeat_kv groups them (head h
reads key head h // g), is rewritten; anything else stays.
Why: Inductor's attention lowering wants dense keys and values, so it writes the repeat out (per pi05-small
action-expert layer and step, 2 × 8 × 179 × 64 floats), and the CPU flash kernel runs 400 rows of one head faster
than 8 heads of 50 rows. pi05-small's compiled denoise step: 0.92× (AOT package) and 0.91× (`module()`); GR00T's
prefix (GQA, 2 heads a group): unchanged (RESULTS §1k). The saved program keeps the original ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qvla_compiler.passes._graph import call, noop_cast, rewrite_each

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
COPIES = (aten.clone.default, aten.contiguous.default)


@dataclass(frozen=True)
class HeadsSecond:
    """The shared heads k1 = transpose(k0, 1, 2), of k0: B×S×Hkv×D; the rewrite adds the transpose (a view)."""

    heads_last: fx.Node


def fold_shared_kv(gm: fx.GraphModule) -> int:
    """Rewrite every match in place; returns how many."""
    return rewrite_each(gm, [m for m in map(_match, gm.graph.find_nodes(op="call_function", target=SDPA)) if m],
                        _rewrite)


def _match(sdpa: fx.Node):
    """(sdpa, q, k1, v1, mask, scale, group size) or None; reads the graph, changes nothing."""
    q, k, v = sdpa.args[:3]
    extra = dict(zip(("attn_mask", "dropout_p", "is_causal"), sdpa.args[3:]), **sdpa.kwargs)
    if extra.get("dropout_p", 0.0) != 0.0 or extra.get("is_causal", False) or not _fake(q):
        return None
    gqa = extra.get("enable_gqa", False)
    k1, v1 = (k, v) if gqa else (_shared(k), _shared(v))
    shape = q.meta["val"].shape
    if (k1 is None or v1 is None or not _fake(_node(k1)) or not _fake(_node(v1)) or len(shape) != 4
            or not _mask_shared(extra.get("attn_mask"))):
        return None
    if not gqa and not all(_only_heads_repeated(*pair, shape[1]) for pair in ((k, k1), (v, v1))):
        return None
    heads, kv_heads = shape[1], _shape(k1)[1]
    if not all(isinstance(n, int) for n in (*shape[1:], kv_heads)) or heads % kv_heads or heads == kv_heads:
        return None
    return sdpa, q, k1, v1, extra.get("attn_mask"), extra.get("scale"), heads // kv_heads


def _shared(node: fx.Node) -> fx.Node | HeadsSecond | None:
    """k1 where `node` is one of the forms that repeat k1's heads over consecutive query heads, else None; the
    shapes (only the heads repeated) are checked by `_only_heads_repeated`."""
    if node.op != "call_function":
        return None
    if node.target is aten.expand.default:  # one head broadcast to all (an expand changes only size-1 dims)
        return node.args[0]
    if node.target is aten.repeat_interleave.self_int:  # each head repeated in place: GR00T's backbone
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        return node.args[0] if dim in (1, -3) else None
    if _swaps_dims_1_2(node):  # SmolVLA: the heads repeated on B×S×Hkv×D, then moved second
        heads_last = _repeat_kv_source(_uncast(node.args[0]), at=3)
        return HeadsSecond(heads_last) if heads_last is not None else None
    return _repeat_kv_source(node, at=2)


def _repeat_kv_source(node: fx.Node, at: int) -> fx.Node | None:
    """x where node = reshape([copy](expand(unsqueeze(x, at)))): transformers' repeat_kv, heads at dim at - 1."""
    if node.op != "call_function" or node.target not in RESHAPES:
        return None
    expand = node.args[0]
    if expand.op == "call_function" and expand.target in COPIES:
        expand = expand.args[0]
    if expand.op != "call_function" or expand.target is not aten.expand.default:
        return None
    unsqueeze = expand.args[0]
    if unsqueeze.op != "call_function" or unsqueeze.target is not aten.unsqueeze.default or unsqueeze.args[1] != at:
        return None
    return unsqueeze.args[0]


def _swaps_dims_1_2(node: fx.Node) -> bool:
    if node.target is aten.transpose.int:
        return sorted(d % 4 for d in node.args[1:]) == [1, 2]
    return node.target is aten.permute.default and list(node.args[1]) == [0, 2, 1, 3]


def _uncast(node: fx.Node) -> fx.Node:
    while noop_cast(node):
        node = node.args[0]
    return node


def _shape(k1: fx.Node | HeadsSecond) -> tuple:
    """k1's shape as B×Hkv×S×D."""
    if isinstance(k1, HeadsSecond):
        b, s, h, d = k1.heads_last.meta["val"].shape
        return b, h, s, d
    return tuple(k1.meta["val"].shape)


def _only_heads_repeated(repeated: fx.Node, source: fx.Node | HeadsSecond, heads: int) -> bool:
    """`repeated` is `source` with its heads repeated to `heads`, every other dim as it was (an expand may also
    broadcast the batch, which the shared heads alone would not)."""
    out, src = repeated.meta["val"].shape, _shape(source)
    return (len(out) == len(src) == 4 and out[1] == heads
            and all(statically_known_true(out[i] == src[i]) for i in (0, 2, 3)))


def _mask_shared(mask) -> bool:
    """No mask, or one whose head dim is 1: then every head (and every stacked row group) reads the same mask."""
    if mask is None:
        return True
    return isinstance(mask, fx.Node) and _fake(mask) and mask.meta["val"].dim() == 4 and mask.meta["val"].shape[1] == 1


def _rewrite(gm: fx.GraphModule, sdpa, q, k1, v1, mask, scale, group) -> None:
    _, h, length, d = q.meta["val"].shape  # static (checked); the batch may be symbolic: -1
    with gm.graph.inserting_before(sdpa):
        k1, v1 = (call(gm, aten.transpose.int, t.heads_last, 1, 2) if isinstance(t, HeadsSecond) else t
                  for t in (k1, v1))
        stacked = call(gm, aten.reshape.default, q, [-1, h // group, group * length, d])
        if mask is not None and mask.meta["val"].shape[2] != 1:  # one mask row per query: repeat it for each group
            mask = call(gm, aten.repeat.default, mask, [1, 1, group, 1])
        out = call(gm, SDPA, stacked, k1, v1, attn_mask=mask, scale=scale)
        heads = call(gm, aten.reshape.default, out, [-1, h, length, d])
    sdpa.replace_all_uses_with(heads)
    gm.graph.erase_node(sdpa)  # dead code elimination keeps it: SDPA is tagged random (its dropout)


def _node(k1: fx.Node | HeadsSecond) -> fx.Node:
    return k1.heads_last if isinstance(k1, HeadsSecond) else k1


def _fake(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)
