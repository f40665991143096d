"""Normalise a captured graph before analysis: in-place ops become their functional forms; eval-mode dropout goes.

Before: what non-strict torch.export under no_grad records for eager code written in place, e.g. SmolVLA's
        `s = matmul(q, k); s *= scale` → `mul_ = aten.mul_.Tensor(matmul, c)`, `h += x` → `aten.add_.Tensor(h, x)`.
After:  `aten.mul.Tensor(matmul, c)` / `aten.add.Tensor(h, x)` (plus `_to_copy` back to the mutated tensor's dtype
        where type promotion would differ); later reads of the mutated tensor read the new node. `aten.linear` and
        every other node are untouched, so the values computed are bit-identical. `aten.dropout(x, p, False)`
        (eval mode; Phi-3's residual dropouts) is x itself: its readers read x, so QuaRot sees the residual add.
Skipped (left in place, still correct): mutations of graph inputs or parameters, ops with no functional twin,
        mutations visible through another alias (a view of the same storage read after the mutation), and ops
        whose value cannot be recomputed on fake tensors (flex_attention's block mask, built under vmap).
Why:    the structural matchers follow dataflow; an in-place op hides that a later read sees the new value.
        The other spellings of the same computation (where / masked_fill masks, baddbmm / einsum products) are
        looked through by the tables in _graph (`is_pointwise`, `MATMUL_OPERANDS`) instead of being rewritten.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qvla_compiler.passes import _graph as g


def normalize_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Functionalise the in-place ops of `gm` (the GraphModule is edited and returned); see the module docstring."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    plans = [(n, twin) for n in gm.graph.nodes if (twin := _functional_twin(n)) is not None]
    modified = False
    for node, twin in plans:  # graph order: a chain `h += a; h *= b` sees its first link already functional
        if _alias_read_later(node, order):
            continue
        try:
            val = g.fake_value(twin, node.args, node.kwargs)
        except Exception:  # noqa: BLE001 - a value only its own trace can make (flex_attention's block mask under
            continue  # vmap): the op stays in place, still correct
        _replace(gm, node, twin, order, val)
        modified = True
    for node in [n for n in gm.graph.nodes if n.target == g.aten.dropout.default and not _training(n)]:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return gm


def _training(dropout: fx.Node) -> bool:
    return bool(dropout.kwargs.get("train", dropout.args[2] if len(dropout.args) > 2 else True))


def _functional_twin(node: fx.Node):
    """`aten.add.Tensor` for `aten.add_.Tensor` (same overload, trailing underscore dropped), when the op writes
    its first argument in place, that argument is an intermediate value, and every fake value is known."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema
    args = schema.arguments
    if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    base = schema.name.split("::")[-1]
    if not base.endswith("_") or base.startswith("_"):
        return None
    packet = getattr(g.aten, base[:-1], None)
    twin = getattr(packet, target._overloadname, None) if packet is not None else None
    mutated = node.args[0]
    if twin is None or not isinstance(mutated, fx.Node) or mutated.op != "call_function":
        return None
    return twin if "val" in node.meta and all("val" in n.meta for n in node.all_input_nodes) else None


def _aliases(node: fx.Node) -> bool:
    """Does `node`'s output share storage with its first argument (a view, or an in-place result)?"""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return _aliases(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None and node.args)


def _alias_read_later(node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Is the storage `node` mutates read after `node` through any alias other than the mutated value itself?"""
    root = node.args[0]
    while _aliases(root):
        root = root.args[0]
    if root.op != "call_function":
        return True  # a view of a graph input or parameter: the mutation is visible to the caller
    group, queue = set(), [root]
    while queue:
        n = queue.pop()
        if n not in group:
            group.add(n)
            queue.extend(u for u in n.users if u is not node and _aliases(u))
    return any(order[u] > order[node] for a in group - {node.args[0]} for u in a.users)


def _replace(gm: fx.GraphModule, node: fx.Node, twin, order: dict[fx.Node, int], val) -> None:
    mutated = node.args[0]
    later = [u for u in mutated.users if u is not node and order[u] > order[node]]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(twin, node.args, node.kwargs)
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        new.meta["val"] = val
        result = new
        if new.meta["val"].dtype != node.meta["val"].dtype:  # in place keeps the mutated tensor's dtype
            result = gm.graph.call_function(g.aten._to_copy.default, (new,), {"dtype": node.meta["val"].dtype})
            result.meta.update(new.meta)
            result.meta["val"] = node.meta["val"]
    for user in later:  # reads after the mutation saw the new value
        user.replace_input_with(mutated, result)
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    order[new] = order[result] = order.pop(node)
