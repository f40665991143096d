"""Small graph helpers shared by the passes: op families and bounded walks over FX dataflow."""
from __future__ import annotations

import contextlib
from collections import deque
import operator
import warnings
from typing import Callable, Iterable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from qvla_compiler.meta import INPUTS_KEY

aten = torch.ops.aten
LINEAR = aten.linear.default
SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)  # a node's meta["val"] that is a size

# Ops that only move, reshape, split, join or cast values: a projection's output keeps its identity through them.
LAYOUT_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.contiguous.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints, aten.unflatten.int,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor, aten.select.int,
    aten.narrow.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default,
    aten.alias.default, aten.detach.default, aten.repeat.default, aten.repeat_interleave.self_int,
    aten.dropout.default, aten.cat.default, aten.index_select.default, aten.lift_fresh_copy.default,
    aten.unbind.int, aten.stack.default,
})
# Ops whose output is their first input's value (a copy, alias or cast): a sum seen through them is still that sum.
IDENTITY_OPS = frozenset({
    aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.lift_fresh_copy.default,
})
# Pointwise ops an MLP puts between its up and down projections (gated activations, tanh-GELU pieces).
ACTIVATION_OPS = frozenset({
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    aten.erf.default, aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.pow.Tensor_Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.sub.Tensor, aten.rsub.Scalar, aten.gelu_.default,
})
# Pointwise ops that torch does not tag `pointwise` (scalar forms of where): masking looks through them too.
_UNTAGGED_POINTWISE = frozenset({aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar})
# Matmul-like ops and their two operands (a, b) of a·b, however the op spells them; None: not a two-operand product.
MATMUL_OPERANDS: dict = {
    aten.matmul.default: lambda n: n.args[:2], aten.bmm.default: lambda n: n.args[:2],
    aten.mm.default: lambda n: n.args[:2], aten.baddbmm.default: lambda n: n.args[1:3],  # bias + α·(b1·b2)
    aten.einsum.default: lambda n: tuple(n.args[1]) if len(n.args[1]) == 2 else None,  # ("eq", [a, b])
}
MATMUL_OPS = frozenset(MATMUL_OPERANDS)
SOFTMAX_OPS = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
ADD_OPS = frozenset({aten.add.Tensor})


def matmul_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) when `node` computes a product a·b of two tensors (a, b as the op reads them), else None."""
    if node.op != "call_function" or node.target not in MATMUL_OPERANDS:
        return None
    return MATMUL_OPERANDS[node.target](node)


def is_pointwise(node: fx.Node) -> bool:
    """An elementwise op (torch's own `pointwise` tag, plus the few untagged ones), e.g. scale, mask, activation."""
    target = node.target
    return node.op == "call_function" and (target in ACTIVATION_OPS or target in _UNTAGGED_POINTWISE or
                                           torch.Tag.pointwise in getattr(target, "tags", ()))


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and "scaled_dot_product" in str(node.target)


def is_flex_attention(node: fx.Node) -> bool:
    """torch's flex_attention (q, k, v, score_mod, block_mask, ...): a fused core whose logits its score_mod edits."""
    return node.op == "call_function" and node.target is getattr(torch.ops.higher_order, "flex_attention", None)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == LINEAR


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_linear(n)]


# ops whose value is their first argument's (the others lend only a dtype or a shape), and factories that read only
# a shape: `q.type_as(v)` (timm's RoPE) does not make v_proj a producer of q, `full_like(t, 25.0)` depends on no input
VALUE_OF_FIRST = frozenset({aten.type_as.default, aten.view_as.default, aten.reshape_as.default,
                            aten.expand_as.default})
SHAPE_ONLY = frozenset({aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
                        aten.empty_like.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
                        aten.new_empty.default})


CHANNEL_NORMS = frozenset({aten.layer_norm.default, aten.rms_norm.default})


def normalises_channels(node: fx.Node, targets: frozenset = CHANNEL_NORMS) -> bool:
    """A fused norm (one of `targets`) over its input's last dim only: a per-token function of the input."""
    return (node.op == "call_function" and node.target in targets and isinstance(node.args[0], fx.Node)
            and list(node.args[1]) == [node.args[0].meta["val"].shape[-1]])


def inputs_of(node: fx.Node) -> list[fx.Node]:
    """The tensors whose values `node` reads: not the symbolic sizes of a dynamic batch (`view(h, [sym_size(x, 0),
    6, 128])`), not the dtype / shape donors of VALUE_OF_FIRST and SHAPE_ONLY ops."""
    if node.op == "call_function" and node.target in SHAPE_ONLY:
        return []
    reads = node.args[:1] if node.op == "call_function" and node.target in VALUE_OF_FIRST else node.all_input_nodes
    return [n for n in reads if isinstance(n, fx.Node) and not isinstance(n.meta.get("val"), SCALARS)]


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
    return _reach(node, lambda n: n.all_input_nodes)


def data_ancestors(node: fx.Node) -> set[fx.Node]:
    """`node` and every node its values depend on (inputs_of): shape reads are not followed (with one dynamic batch
    for all inputs, export reads the size from one of them, `sym_size(text, 0)`, for every `reshape(B, ...)`)."""
    return _reach(node, inputs_of)


def descendants(node: fx.Node) -> set[fx.Node]:
    """`node` and every node computed from it."""
    return _reach(node, lambda n: n.users)


def _reach(node: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    seen, queue = set(), deque([node])
    while queue:
        n = queue.popleft()
        if n not in seen:
            seen.add(n)
            queue.extend(step(n))
    return seen


def real_users(node: fx.Node) -> list[fx.Node]:
    """The nodes that use `node`'s value: export's dtype asserts on it are not uses."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def noop_cast(node: fx.Node) -> bool:
    """A dtype cast (`to`, `_to_copy`, `type_as`) whose input already has that dtype."""
    if node.op != "call_function" or node.target not in (aten.to.dtype, aten._to_copy.default, aten.type_as.default):
        return False
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    return isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dtype == after.dtype


def rewrite_each(gm: fx.GraphModule, matches: list, rewrite: Callable) -> int:
    """`rewrite(gm, *match)` for every match (all found before any rewrite), then the dead code dropped and `gm`
    recompiled; returns how many."""
    for match in matches:
        rewrite(gm, *match)
    if matches:
        drop_dead_code(gm.graph)
        gm.recompile()
    return len(matches)


def drop_dead_code(graph: fx.Graph) -> None:
    """Dead code elimination, export's dtype asserts on values nothing else reads included (they would keep a
    replaced chain alive)."""
    stale = [None]
    while stale:
        graph.eliminate_dead_code()
        stale = [a for a in graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default)
                 if not real_users(a.args[0])]
        for node in stale:
            graph.erase_node(node)


def drop_unused_attributes(gm: fx.GraphModule) -> fx.GraphModule:
    """Keep only the tensors the graph reads (ep.module() keeps every parameter of the policy: the denoise graph need
    not carry the vision tower), so saved programs and byte counts hold each tensor once."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.recompile()
    return gm


def is_constant(node: fx.Node) -> bool:
    """True when no graph input reaches `node` (parameters, literals and values made from them)."""
    return not any(n.op == "placeholder" for n in ancestors(node))


def time_input(gm: fx.GraphModule) -> fx.Node | None:
    """The placeholder tagged with the "time" role at capture (the flow time of a denoise step), if any."""
    roles = gm.meta.get(INPUTS_KEY, ())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return next((p for p, role in zip(placeholders, roles) if role == "time"), None)


def after_inputs(gm: fx.GraphModule, x: fx.Node, t: fx.Node | None) -> fx.Node:
    """Where a node reading x and t goes: after the later of the two in graph order, and never among the
    placeholders (x may be an input placed before the time input)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    anchor = t if t is not None and order[t] > order[x] else x
    if anchor.op == "placeholder":
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    return anchor


def drop_attribute(gm: fx.GraphModule, attr: fx.Node) -> None:
    """Erase the get_attr node `attr` and delete its tensor from gm, once nothing reads them (only that tensor: a
    submodule a call_module node runs may share others with the user's model)."""
    if attr.users:
        return
    gm.graph.erase_node(attr)
    if not any(n.op == "get_attr" and n.target == attr.target for n in gm.graph.nodes):
        owner, _, name = attr.target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, name)


def attr_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a get_attr target names (`a.b.weight`)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def replace_attr_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Point a get_attr target at a fresh tensor (never written in place: it may be the user's parameter)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, name)
    setattr(owner, name, torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter)
            else value)


def fake_value(op, args, kwargs=None):
    """What `op(*args, **kwargs)` gives on the fake values (meta["val"]) of its node arguments: shapes and dtypes."""
    vals = fx.node.map_arg((args, kwargs or {}), lambda n: n.meta.get("val"))
    with detect_fake_mode(torch.utils._pytree.tree_leaves(vals)) or contextlib.nullcontext():
        return op(*vals[0], **vals[1])


def graph_fake_mode(gm: fx.GraphModule):
    """The fake mode of the graph's input values (export's), or None for a graph captured without them."""
    return detect_fake_mode([n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")])


def attr_value(gm: fx.GraphModule, tensor: torch.Tensor):
    """meta["val"] for a get_attr of `tensor`: a fake tensor of the graph's fake mode (the tensor itself without)."""
    mode = graph_fake_mode(gm)
    return mode.from_tensor(tensor, static_shapes=True) if mode else tensor


def fill_values(gm: fx.GraphModule) -> fx.GraphModule:
    """meta["val"] for the nodes a rewrite added without one (integer buffers, qvla:: ops, their getitems), in the
    graph's fake mode, so later passes read every node's shape."""
    mode = graph_fake_mode(gm)
    if mode is None:
        return gm
    for node in gm.graph.nodes:
        if "val" in node.meta or node.op not in ("get_attr", "call_function"):
            continue
        if node.op == "get_attr":
            value = attr_tensor(gm, node.target)
            if isinstance(value, torch.Tensor):  # not a subgraph (flex_attention's score_mod)
                node.meta["val"] = attr_value(gm, value)
        elif all("val" in n.meta for n in node.all_input_nodes):
            with mode:
                node.meta["val"] = fake_value(node.target, node.args, node.kwargs)
    return gm


def call(gm: fx.GraphModule, op, *args, **kwargs) -> fx.Node:
    """A new node `op(*args, **kwargs)` at the graph's insertion point, its meta["val"] set."""
    node = gm.graph.call_function(op, args, kwargs)
    node.meta["val"] = fake_value(op, args, kwargs)
    return node


WARNINGS = "qvla_warnings"  # graph meta: what capture warned about, for the quantize report (and --json)


def warn(gm: fx.GraphModule, message: str, category: type[Warning]) -> None:
    """Warn, and keep the message in the graph's meta so the quantize report lists it too."""
    if message not in gm.meta.setdefault(WARNINGS, []):  # a pass run twice on one graph says it once
        gm.meta[WARNINGS].append(message)
    warnings.warn(message, category, stacklevel=4)
