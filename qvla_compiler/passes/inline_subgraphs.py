"""Inline the subgraphs torch.export keeps for `with torch.autocast(...)` and `with torch.enable_grad()` blocks.

Before: ys = higher_order.wrap_with_autocast(device, dtype, enabled, cache, submod, *xs) (a forward that runs part of
        itself under autocast, e.g. GR00T's bf16 sampling), or higher_order.wrap_with_set_grad_enabled(on, submod,
        *xs); the block's linears live in `submod`, where no pass sees them.
After:  the block's nodes in the parent graph. Under autocast, an op whose result dtype autocast changes (its
        lower-precision ops: linear, matmul, bmm, ...; its fp32 ops: softmax, norms, ...) gets its floating inputs cast
        first (aten._to_copy), which is what autocast does; the grad mode is irrelevant to an inference graph.
        Subgraphs of other higher-order ops (torch.cond, ...) stay; their linears stay float, with a warning.
Invariant: the same values bit for bit (autocast casts the same inputs and runs the same kernels). Which ops cast is
        read from torch, not copied: each op of a block runs once on fake tensors with and without autocast.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from qvla_compiler.passes import _graph as g

AUTOCAST = torch.ops.higher_order.wrap_with_autocast
GRAD_MODE = torch.ops.higher_order.wrap_with_set_grad_enabled
DECIDED = "qvla_autocast_decided"  # an inlined op whose casts an inner autocast block already made explicit


class SubgraphLinearsWarning(UserWarning):
    """Linears inside a higher-order op's subgraph that qvla cannot inline: they stay float."""


def inline_subgraphs(gm: fx.GraphModule) -> fx.GraphModule:
    """Inline every autocast / grad-mode block of `gm` (nested blocks too); see the module docstring."""
    blocks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (AUTOCAST, GRAD_MODE)]
    for hop in blocks:
        _inline(gm, hop)
    if blocks:
        gm.graph.lint()
        gm.recompile()
    _warn_hidden_linears(gm)
    return gm


def _inline(gm: fx.GraphModule, hop: fx.Node) -> None:
    if hop.target is AUTOCAST:
        device, dtype, enabled, _, sub, *operands = hop.args
        policy = (device, dtype) if enabled else None
    else:
        _, sub, *operands = hop.args
        policy = None
    decides = hop.target is AUTOCAST  # an inner autocast block, on or off, decides its ops' casts for good
    block = inline_subgraphs(getattr(gm, sub.target))
    env = dict(zip([n for n in block.graph.nodes if n.op == "placeholder"], operands))
    made = {}
    for node in block.graph.nodes:
        if node.op == "output":
            outputs = map_arg(node.args[0], env.__getitem__)
        elif node.op == "get_attr":
            env[node] = _copy_attr(gm, block, node, hop)
        elif node.op == "call_function":
            env[node] = _copy_op(gm, node, map_arg(node.args, env.__getitem__),
                                 map_arg(node.kwargs, env.__getitem__), policy, decides, hop, made)
    for user in list(hop.users):  # export reads a block's results as getitem(block, i)
        user.replace_all_uses_with(outputs[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(hop)
    if not sub.users:
        gm.graph.erase_node(sub)
        delattr(gm, sub.target)


def _copy_attr(gm: fx.GraphModule, block: fx.GraphModule, node: fx.Node, before: fx.Node) -> fx.Node:
    base, i = node.target.replace(".", "_"), 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    name = f"{base}_{i}"
    gm.register_buffer(name, g.attr_tensor(block, node.target))
    with gm.graph.inserting_before(before):
        new = gm.graph.get_attr(name)
    new.meta.update(node.meta)
    return new


def _copy_op(gm: fx.GraphModule, node: fx.Node, args, kwargs, policy, decides: bool, before: fx.Node,
             made: dict) -> fx.Node:
    with gm.graph.inserting_before(before):
        if policy is not None and not node.meta.get(DECIDED):
            args, kwargs = _autocast_inputs(gm, node.target, args, kwargs, *policy, made)
        new = gm.graph.call_function(node.target, args, kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    new.meta["val"] = g.fake_value(node.target, args, kwargs)
    new.meta[DECIDED] = decides or node.meta.get(DECIDED, False)
    return new


def _autocast_inputs(gm: fx.GraphModule, op, args, kwargs, device: str, dtype: torch.dtype, made: dict):
    """args / kwargs with the casts autocast makes before running `op` on them: traced on fake tensors, not read from
    a list, so the block means what it meant under the torch that ran it."""
    casts = _traced_casts(op, args, kwargs, device, dtype)

    def cast(a: fx.Node) -> fx.Node:
        if a not in casts:
            return a
        if (a, casts[a]) not in made:  # one cast per value, as autocast's cache: q/k/v keep one shared input
            made[a, casts[a]] = g.call(gm, g.aten._to_copy.default, a, dtype=casts[a])
        return made[a, casts[a]]

    return map_arg(args, cast), map_arg(kwargs, cast)


class _CastRecorder(TorchDispatchMode):
    """Records the dtype conversions applied to a given set of tensors (autocast's input casts)."""

    def __init__(self, inputs: dict[int, fx.Node]):
        super().__init__()
        self.inputs, self.casts = inputs, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is g.aten._to_copy.default and id(args[0]) in self.inputs and "dtype" in (kwargs or {}):
            self.casts.setdefault(self.inputs[id(args[0])], kwargs["dtype"])
        return func(*args, **(kwargs or {}))


def _traced_casts(op, args, kwargs, device: str, dtype: torch.dtype) -> dict[fx.Node, torch.dtype]:
    nodes = [n for n in tree_leaves((args, kwargs)) if isinstance(n, fx.Node)]
    recorder = _CastRecorder({id(n.meta.get("val")): n for n in nodes})
    with recorder, torch.autocast(device, dtype):
        g.fake_value(op, args, kwargs)
    return recorder.casts


def _warn_hidden_linears(gm: fx.GraphModule) -> None:
    for name, sub in gm.named_children():
        if isinstance(sub, fx.GraphModule) and any(g.is_linear(n) for n in sub.graph.nodes):
            if any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
                g.warn(gm, f"qvla: the linears inside subgraph '{name}' (a torch.cond / higher-order op block) "
                           "stay float: qvla inlines only autocast and grad-mode blocks. Write the block as plain "
                           "code to quantize them.", SubgraphLinearsWarning)
