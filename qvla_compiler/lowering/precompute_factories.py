"""Tensors made from static arguments alone (linspace, arange, full, ones…) → constants of the graph the compile
paths hand to Inductor, so that freezing folds everything computed from them and the weights alone.

Before:
    t = linspace(0, 1, 4);  e = sincos(t · f);  m = linear(e, W)       every call computes the table m
After:
    t = get_attr(<the same tensor, computed once>);  …                 Inductor's freezing folds e and m into
                                                                        constants (an AOT package: at its first run)
Invariant: the same tensor, made by the same op with the same arguments. Only deterministic ops with no input
node (no tensor, no symbolic size: a size read off the batch keeps the op in the graph) and an output of at most
MAX_ELEMENTS that nothing writes into; `empty` (undefined contents) and random ops stay.
Why: Inductor's constant folding starts from the frozen weights, not from factory ops, so a table computed from the
sampler's fixed timesteps was recomputed at every call: GR00T's timestep encoder and AdaLN modulations for all the
schedule's steps (`table_time_values` put them in the prefix), pi0.5's time MLP and adaRMS modulations likewise.
The saved program keeps the original ops.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qvla_compiler.lowering._between_graphs import adopted
from qvla_compiler.passes._graph import rewrite_each

aten = torch.ops.aten
UNDEFINED = frozenset({aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default})
MAX_ELEMENTS = 1 << 20  # a constant this large is kept resident, with whatever Inductor folds from it


def precompute_factories(gm: fx.GraphModule) -> int:
    """Replace every static factory of `gm` by a constant, in place; returns how many."""
    return rewrite_each(gm, [(n,) for n in gm.graph.nodes if _static_factory(n)], _rewrite)


def _static_factory(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and not node.all_input_nodes
            and bool(node.users) and not node.is_impure() and node.target not in UNDEFINED
            and torch.Tag.nondeterministic_seeded not in node.target.tags
            and isinstance(val, torch.Tensor) and val.numel() <= MAX_ELEMENTS and not _written(node))


def _written(node: fx.Node) -> bool:
    """Whether an op writes into `node`'s tensor, itself or through a view (`ones(3).mul_(x)`, `z[:, 0] = x`): a
    constant would keep the write for the next call. An op without a schema counts as writing."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is None:
            return True
        for i, arg in enumerate(schema.arguments):
            value = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
            if value is node and arg.alias_info is not None and (arg.alias_info.is_write or _written(user)):
                return True
    return False


def _rewrite(gm: fx.GraphModule, factory: fx.Node) -> None:
    with gm.graph.inserting_before(factory):
        constant = adopted(gm, factory.target(*factory.args, **factory.kwargs), f"qvla_const_{factory.name}")
    factory.replace_all_uses_with(constant)
    gm.graph.erase_node(factory)
