"""What every denoise step recomputes from the prefix alone moves into the prefix graph, computed once per sample.

Before: the denoise graph reads the prefix outputs p and recomputes f(p) at every one of the sampler's steps, e.g.
GR00T's cross-attention keys and values of the VL features (`to_k(vl)`, `to_v(vl)`), float or integer:
    prefix(obs) -> (p0 … pn)              denoise((p0 … pn), x, t) -> v,  reading f(p) for some pure f
After:
    prefix(obs) -> (p0 … pn, f(p) …)      denoise((p0 … pn, f(p) …), x, t) -> v,  f's nodes gone from it
Invariant: the same ops on the same values, so every output is bit-identical (tested exactly). Only pure ops that
read no action or time input move (a per-step scale gathered by t stays in the step); only values whose computation
holds a GEMM, attention or qvla:: op (a cheap view or mask stays where it is, costing no memory); only values with
the batch in dim 0 (what the saved step's dynamic batch takes; otherwise what they are computed from moves).
Why: GR00T's DiT cross-attends to the VL features in half its blocks (SmolVLA's expert to the VLM's keys and values
likewise); at groot-full's shapes those projections are about half the step's multiply-adds. The sampler passes the
prefix tuple to the step unchanged, so a saved program, its AOT package and `module()` run the hoisted pair as they
ran the original.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qvla_compiler.meta import INPUTS_KEY, QVLA_META
from qvla_compiler.passes._graph import attr_tensor, drop_dead_code, drop_unused_attributes, fake_value, real_users
from qvla_compiler.passes.check_schedule import SCHEDULE_KEY, record_schedule

aten = torch.ops.aten
SIZE_ARITHMETIC = frozenset({operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                             operator.neg})
HEAVY = frozenset({aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
                   aten.baddbmm.default, aten.convolution.default, aten.conv2d.default, aten.einsum.default,
                   aten.scaled_dot_product_attention.default})


def hoist_invariants(prefix: fx.GraphModule, denoise: fx.GraphModule) -> list[str]:
    """Rewrite both graphs in place; returns what the prefix now returns for the step: each value's node name and
    the linears it holds ("transpose_1 (action_head.transformer_blocks.0.attn1.to_k)")."""
    invariant, reads_prefix, heavy = _invariant_nodes(denoise)
    worth = {n for n in invariant if reads_prefix[n] and heavy[n]}
    frontier = [n for n in worth if any(u not in invariant for u in real_users(n))]
    batch = next((p.meta["val"].shape[0] for p, role in _roles(denoise).items() if role == "action"), None)
    chosen = _batch_first(frontier, worth, batch)
    moved = [n for n in denoise.graph.nodes if n in chosen]  # graph order: a saved program's bytes are reproducible
    if not moved or len(_prefix_inputs(denoise)) != len(_output_node(prefix).args[0]):
        return []
    order = {n: i for i, n in enumerate(denoise.graph.nodes)}
    labels = [_label(n, invariant, order) for n in moved]
    values = _copy_into(prefix, denoise, invariant, moved)
    _return_more(prefix, values)
    _take_more(denoise, moved)
    for gm in (prefix, denoise):  # compute moved between the graphs on purpose: their checked schedules follow it
        if SCHEDULE_KEY in gm.meta:
            record_schedule(gm)
    return labels


def _label(node: fx.Node, invariant: set, order: dict[fx.Node, int]) -> str:
    infos = [n.meta.get(QVLA_META) for n in sorted(_cone([node], invariant), key=order.__getitem__)]
    paths = dict.fromkeys(i.module_path for i in infos if hasattr(i, "module_path"))
    return f"{node.name} ({', '.join(paths)})" if paths else node.name


def _batch_first(nodes, worth: set, batch) -> set[fx.Node]:
    """`nodes`, each one whose dim 0 is not the batch replaced by what it is computed from: the saved step takes
    every prefix value with a dynamic batch in dim 0."""
    chosen = set()
    for node in nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() and statically_known_true(val.shape[0] == batch):
            chosen.add(node)
        else:
            chosen |= _batch_first([n for n in node.all_input_nodes if n in worth], worth, batch)
    return chosen


def _roles(gm: fx.GraphModule) -> dict[fx.Node, str]:
    return dict(zip(gm.graph.find_nodes(op="placeholder"), gm.meta.get(INPUTS_KEY, ())))


def _prefix_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    return [p for p, role in _roles(gm).items() if role == "prefix"]


def _invariant_nodes(gm: fx.GraphModule) -> tuple[set[fx.Node], dict[fx.Node, bool], dict[fx.Node, bool]]:
    """The nodes computed from prefix inputs and constants alone by pure ops; reads_prefix[node]: a prefix input
    among them (a value of constants alone is Inductor's to fold); heavy[node]: a GEMM-like op among them."""
    roles = _roles(gm)
    invariant, reads_prefix, heavy = set(), {}, {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            ok = reads_prefix[node] = roles.get(node) == "prefix"
        elif node.op == "get_attr":
            ok, reads_prefix[node] = True, False
        elif _size_in_prefix(node, roles):  # export reads the shared batch size off any input, x_t's too
            ok = reads_prefix[node] = True
        else:
            ok = node.op == "call_function" and _pure(node) and all(n in invariant for n in inputs)
            reads_prefix[node] = any(reads_prefix.get(n, False) for n in inputs)
        if ok:
            invariant.add(node)
            heavy[node] = _is_heavy(node) or any(heavy.get(n, False) for n in inputs)
    return invariant, reads_prefix, heavy


def _size_in_prefix(node: fx.Node, roles: dict) -> tuple[fx.Node, int] | None:
    """(prefix input, dim) of the same symbolic size, for `sym_size(x, d)` of a non-prefix input x."""
    if node.target is not aten.sym_size.int or roles.get(node.args[0]) == "prefix":
        return None
    size = node.meta.get("val")
    for p in (p for p, role in roles.items() if role == "prefix"):
        val = p.meta.get("val")
        for dim, other in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if type(other) is type(size) and statically_known_true(other == size):
                return p, dim
    return None


def _pure(node: fx.Node) -> bool:
    """An aten / qvla op without side effects or randomness (higher-order ops, whose bodies are subgraphs, stay)."""
    if node.target in SIZE_ARITHMETIC:  # getitem, and Python arithmetic on symbolic sizes
        return True
    return (isinstance(node.target, torch._ops.OpOverload) and not node.is_impure()
            and node.target is not aten._assert_tensor_metadata.default
            and torch.Tag.nondeterministic_seeded not in node.target.tags)


def _is_heavy(node: fx.Node) -> bool:
    return node.target in HEAVY or getattr(node.target, "namespace", None) == "qvla"


def _copy_into(prefix: fx.GraphModule, denoise: fx.GraphModule, invariant: set, moved: list) -> list[fx.Node]:
    """Copies of `moved` and what they read, appended to the prefix graph before its output, their shapes
    re-derived in the prefix graph's symbols; returns the copies."""
    needed, roles = _cone(moved, invariant), _roles(denoise)
    env: dict[fx.Node, fx.Node] = dict(zip(_prefix_inputs(denoise), _output_node(prefix).args[0]))  # in order
    mode = detect_fake_mode([n.meta.get("val") for n in prefix.graph.find_nodes(op="placeholder")])
    with prefix.graph.inserting_before(_output_node(prefix)), mode or contextlib.nullcontext():  # for factories
        for node in denoise.graph.nodes:
            if node not in needed or node in env:
                continue
            if (size := _size_in_prefix(node, roles)) is not None:
                env[node] = prefix.graph.call_function(aten.sym_size.int, (env[size[0]], size[1]))
                env[node].meta["val"] = fake_value(aten.sym_size.int, env[node].args)
            elif node.op == "get_attr":
                env[node] = copy = prefix.graph.get_attr(_adopt(prefix, denoise, node.target))
                tensor = attr_tensor(prefix, copy.target)
                copy.meta["val"] = mode.from_tensor(tensor, static_shapes=True) if mode else tensor
            else:
                env[node] = copy = prefix.graph.node_copy(node, lambda n: env[n])
                copy.meta["val"] = fake_value(copy.target, copy.args, copy.kwargs)
    return [env[n] for n in moved]


def _cone(moved: list[fx.Node], invariant: set) -> set[fx.Node]:
    seen, stack = set(), list(moved)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(n for n in node.all_input_nodes if n in invariant)  # a size read off x_t: not x_t
    return seen


def _adopt(prefix: fx.GraphModule, denoise: fx.GraphModule, target: str) -> str:
    """The denoise graph's tensor `target` as an attribute of the prefix graph (shared, not copied), under the same
    name where it is free, so a saved program's tensor names still say which linear they belong to."""
    tensor, name = attr_tensor(denoise, target), target
    while _has_attr(prefix, name) and attr_tensor(prefix, name) is not tensor:
        name = "hoisted_" + name.replace(".", "_")
    owner_path, _, leaf = name.rpartition(".")
    owner = prefix
    for part in owner_path.split(".") if owner_path else ():
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if isinstance(tensor, torch.nn.Parameter):
        owner.register_parameter(leaf, tensor)
    else:
        owner.register_buffer(leaf, tensor)
    return name


def _has_attr(gm: fx.GraphModule, target: str) -> bool:
    try:
        attr_tensor(gm, target)
    except AttributeError:
        return False
    return True


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return gm.graph.find_nodes(op="output")[0]


def _return_more(prefix: fx.GraphModule, values: list[fx.Node]) -> None:
    out = _output_node(prefix)
    out.args = (type(out.args[0])((*out.args[0], *values)),)
    returned = _example(prefix.graph._codegen.pytree_info.out_spec)  # the prefix's tuple of tensors
    _respec(prefix, out_spec=pytree.tree_structure(type(returned)((*returned, *range(len(values))))))


def _take_more(denoise: fx.GraphModule, moved: list[fx.Node]) -> None:
    """A new prefix input per moved value, after the existing prefix inputs; the recomputation is dropped."""
    roles = list(denoise.meta[INPUTS_KEY])
    placeholders = denoise.graph.find_nodes(op="placeholder")
    last = max(i for i, role in enumerate(roles) if role == "prefix")
    with denoise.graph.inserting_after(placeholders[last]):
        for node in reversed(moved):
            new = denoise.graph.placeholder(f"hoisted_{node.name}")
            new.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(new)
    denoise.meta[INPUTS_KEY] = (*roles[:last + 1], *("prefix",) * len(moved), *roles[last + 1:])
    drop_dead_code(denoise.graph)
    drop_unused_attributes(denoise)  # the moved weights live in the prefix graph now: saved once
    (prefix_values, *rest), kwargs = _example(denoise.graph._codegen.pytree_info.in_spec)  # ((prefix…), x, t), {}
    more = type(prefix_values)((*prefix_values, *range(len(moved))))
    _respec(denoise, in_spec=pytree.tree_structure(((more, *rest), kwargs)))


def _example(spec):
    return pytree.tree_unflatten(list(range(spec.num_leaves)), spec)


def _respec(gm: fx.GraphModule, *, in_spec=None, out_spec=None) -> None:
    info = gm.graph._codegen.pytree_info
    gm.graph._codegen.pytree_info = info._replace(in_spec=in_spec or info.in_spec, out_spec=out_spec or info.out_spec)
    gm.graph.lint()
    gm.recompile()
