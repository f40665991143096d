"""Fold linear weights (and biases) computed from parameters only into real buffers.

Before: y = aten.linear(x, f(P, Q, …), h(B, …)) where f / h only slice, split, transpose, concatenate, cast or scale
        parameters — nn.MultiheadAttention's in_proj_weight split into q and k/v rows, tied or scaled weights.
After:  y = aten.linear(x, W, b) with W = f(P, Q, …) evaluated once, registered as the buffer
        `<owner>.<stem>_<k>.weight` (its bias beside it), so classify/quantize/lower see an ordinary weight.
        Structurally identical computations (a head called twice) share one buffer; parameters that nothing reads
        any more are deleted. A weight that depends on a graph input is left alone (quantize_linears keeps it float
        and reports why).
Invariant: every folded weight is bit-identical to what the graph computed (same ops, same tensors, run once at
        compile time); outputs agree up to the GEMM's rounding (a copy may take another BLAS path than a view).
Runs right after capture and before record_schedule: the folded ops leave the operator schedule.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_arg

from qvla_compiler.passes import _graph as g

_OPERANDS = ((1, "weight"), (2, "bias"))  # aten.linear(x, weight, bias)
# get_attr meta of a folded buffer: the parameter tensors it was computed from (the policy's own objects, which the
# graph no longer reads), so that a consuming compile can release them once the buffer's integer copy exists
FOLDED_FROM = "qvla_folded_from"


def fold_computed_weights(gm: fx.GraphModule) -> fx.GraphModule:
    folded: dict[str, fx.Node] = {}  # structural signature of the computation → get_attr of its buffer
    replaced: list[fx.Node] = []
    for node in g.linear_nodes(gm):
        for index, kind in _OPERANDS:
            operand = node.args[index] if len(node.args) > index else None
            if not _foldable(operand):
                continue
            key = repr(_structure(operand))
            if key not in folded:
                folded[key] = _materialise(gm, operand, _target_for(gm, node, operand, kind))
            node.replace_input_with(operand, folded[key])
            replaced.append(operand)
    erased: set[fx.Node] = set()
    for operand in replaced:
        _erase_if_unused(gm, operand, erased)
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return gm


def _foldable(operand) -> bool:
    """A call_function computed from get_attr tensors only, by deterministic ops."""
    if not isinstance(operand, fx.Node) or operand.op != "call_function":
        return False
    return all(n.op == "get_attr" or (n.op == "call_function" and not _seeded(n)) for n in g.ancestors(operand))


def _seeded(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _structure(node: fx.Node):
    # Two computations are the same iff they apply the same ops, with the same literals, to the same attributes.
    if node.op == "get_attr":
        return ("attr", node.target)
    return (str(node.target), map_arg(node.args, _structure), map_arg(node.kwargs, _structure))


def _evaluate(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    needed, env = g.ancestors(node), {}
    with torch.no_grad():
        for n in gm.graph.nodes:  # graph order is a topological order
            if n not in needed:
                continue
            if n.op == "get_attr":
                env[n] = _attr(gm, n.target)
            else:
                env[n] = n.target(*map_arg(n.args, env.__getitem__), **map_arg(n.kwargs, env.__getitem__))
    return env[node]


def _materialise(gm: fx.GraphModule, operand: fx.Node, target: str) -> fx.Node:
    # A copy, never a view: the buffer must not share storage with the parameter it came from (byte counts, save).
    value = _evaluate(gm, operand).detach().clone().contiguous()
    owner_path, _, name = target.rpartition(".")
    gm.get_submodule(owner_path).register_buffer(name, value)
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):  # before every reader, like the captured attrs
        node = gm.graph.get_attr(target)
    node.meta["val"] = operand.meta.get("val", value)
    node.meta[FOLDED_FROM] = tuple(_attr(gm, n.target) for n in g.ancestors(operand) if n.op == "get_attr")
    return node


def _target_for(gm: fx.GraphModule, linear: fx.Node, operand: fx.Node, kind: str) -> str:
    """`<owner>.<stem>_<k>.<kind>`: owner and stem from the first parameter the computation reads."""
    weight = linear.args[1]
    if kind == "bias" and weight.op == "get_attr" and weight.target.endswith(".weight"):
        home = weight.target.removesuffix(".weight")
        if not hasattr(gm.get_submodule(home), "bias"):  # the bias goes beside the folded weight
            return home + ".bias"
    reads = g.ancestors(operand)  # a weight made by factories alone (torch.eye(n) in forward) reads no parameter
    source = next((n.target for n in gm.graph.nodes if n in reads and n.op == "get_attr"), "folded")
    owner, _, leaf = source.rpartition(".")
    stem = re.sub(r"_?(weight|bias)$", "", leaf) or "folded"
    parent, k = gm.get_submodule(owner), 0
    while hasattr(parent, f"{stem}_{k}"):
        k += 1
    parent.add_module(f"{stem}_{k}", nn.Module())
    return f"{owner + '.' if owner else ''}{stem}_{k}.{kind}"


def _erase_if_unused(gm: fx.GraphModule, start: fx.Node, erased: set[fx.Node]) -> None:
    """Erase `start` and, transitively, the inputs it leaves unread; delete attributes no node reads any more."""
    stack = [start]
    while stack:
        node = stack.pop()
        if node in erased or node.users:
            continue
        stack.extend(node.all_input_nodes)
        gm.graph.erase_node(node)
        erased.add(node)
        if node.op == "get_attr" and not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
            owner, _, name = node.target.rpartition(".")
            delattr(gm.get_submodule(owner), name)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)
