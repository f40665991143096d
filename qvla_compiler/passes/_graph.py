"""Small graph helpers shared by the passes: op families and bounded walks over FX dataflow."""
from __future__ import annotations

from collections import deque
import operator
from typing import Callable, Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten
LINEAR = aten.linear.default

# Ops that only move, reshape, split, join or cast values: a projection's output keeps its identity through them.
LAYOUT_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.contiguous.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor, aten.select.int,
    aten.narrow.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default,
    aten.alias.default, aten.detach.default, aten.repeat.default, aten.repeat_interleave.self_int,
    aten.dropout.default, aten.cat.default, aten.index_select.default, aten.lift_fresh_copy.default,
})
# Pointwise ops an MLP puts between its up and down projections (gated activations, tanh-GELU pieces).
ACTIVATION_OPS = frozenset({
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    aten.erf.default, aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.pow.Tensor_Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.sub.Tensor, aten.rsub.Scalar, aten.gelu_.default,
})
MATMUL_OPS = frozenset({aten.matmul.default, aten.bmm.default, aten.mm.default})
SOFTMAX_OPS = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
ADD_OPS = frozenset({aten.add.Tensor})


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and "scaled_dot_product" in str(node.target)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == LINEAR


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_linear(n)]


def inputs_of(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def walk(start: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
         stop: Callable[[fx.Node], bool], passable: Callable[[fx.Node], bool]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Breadth-first walk from `start` along `step`. Returns (stopped_at, blocked): nodes where `stop` held
    (not walked past), and nodes that are neither stops nor passable (the walk ends there)."""
    stopped, blocked, seen = set(), set(), set()
    queue = deque(start)
    while queue:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if stop(node):
            stopped.add(node)
        elif passable(node):
            queue.extend(step(node))
        else:
            blocked.add(node)
    return stopped, blocked


def producers(node: fx.Node, passable: Callable[[fx.Node], bool]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Linears that produce `node` through passable ops, and the non-passable nodes met on the way."""
    return walk([node], inputs_of, is_linear, passable)


def consumers(node: fx.Node, passable: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """Linears that consume `node` through passable ops."""
    return walk(node.users, lambda n: n.users, is_linear, passable)[0]


def op_in(ops: frozenset) -> Callable[[fx.Node], bool]:
    return lambda n: n.op == "call_function" and (n.target in ops or n.target is operator.getitem)


def ancestors(node: fx.Node) -> set[fx.Node]:
    """`node` and every node it depends on."""
    seen, queue = set(), deque([node])
    while queue:
        n = queue.popleft()
        if n not in seen:
            seen.add(n)
            queue.extend(n.all_input_nodes)
    return seen


def is_constant(node: fx.Node) -> bool:
    """True when no graph input reaches `node` (parameters, literals and values made from them)."""
    return not any(n.op == "placeholder" for n in ancestors(node))
