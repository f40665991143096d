"""What hoist_invariants and table_time_values share: which denoise-step nodes one kind of input decides alone, and
moving such values into the prefix graph, whose outputs the step then reads as extra prefix inputs."""
from __future__ import annotations

import contextlib
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qvla_compiler.meta import INPUTS_KEY, QVLA_META
from qvla_compiler.passes._graph import (attr_tensor, attr_value, call, drop_dead_code, drop_unused_attributes,
                                         fake_value, graph_fake_mode, noop_cast, real_users)
from qvla_compiler.passes.check_schedule import SCHEDULE_KEY, record_schedule

aten = torch.ops.aten
SIZE_ARITHMETIC = frozenset({operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                             operator.neg})
HEAVY = frozenset({aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
                   aten.baddbmm.default, aten.convolution.default, aten.conv2d.default, aten.einsum.default,
                   aten.scaled_dot_product_attention.default})


def roles(gm: fx.GraphModule) -> dict[fx.Node, str]:
    return dict(zip(gm.graph.find_nodes(op="placeholder"), gm.meta.get(INPUTS_KEY, ())))


def inputs_of_role(gm: fx.GraphModule, role: str) -> list[fx.Node]:
    return [p for p, r in roles(gm).items() if r == role]


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose values `node` reads: `type_as(a, b)` reads only b's dtype, which is static (GR00T casts its
    timestep embedding with `.type_as(x_t)`)."""
    return [node.args[0]] if node.target is aten.type_as.default else node.all_input_nodes


def pure(node: fx.Node) -> bool:
    """An aten / qvla op without side effects or randomness (higher-order ops, whose bodies are subgraphs, stay)."""
    if node.target in SIZE_ARITHMETIC:  # getitem, and Python arithmetic on symbolic sizes
        return True
    return (isinstance(node.target, torch._ops.OpOverload) and not node.is_impure()
            and node.target is not aten._assert_tensor_metadata.default
            and torch.Tag.nondeterministic_seeded not in node.target.tags)


def is_heavy(node: fx.Node) -> bool:
    """A GEMM, attention, or a qvla:: op other than the per-row bookkeeping (a step's scale, a row's quantization)."""
    if getattr(node.target, "namespace", None) == "qvla":
        return node.target not in (torch.ops.qvla.step_scale.default, torch.ops.qvla.quantize_act.default)
    return node.target in HEAVY


def decided_by(gm: fx.GraphModule, role: str, size_source: Callable) -> tuple[set, dict, dict]:
    """The nodes computed by pure ops from inputs of `role` and constants alone; reads[node]: such an input among
    them (a value of constants alone is Inductor's to fold); heavy[node]: a GEMM-like op among them.
    `size_source(node)` is not None for a size of another input that an input of `role` has too."""
    kinds = roles(gm)
    nodes, reads, heavy = set(), {}, {}
    for node in gm.graph.nodes:
        inputs = value_inputs(node)
        if node.op == "placeholder":
            ok = reads[node] = kinds.get(node) == role
        elif node.op == "get_attr":
            ok, reads[node] = True, False
        elif size_source(node) is not None:  # export reads a shared size off any input, x_t's too
            ok = reads[node] = True
        else:
            ok = node.op == "call_function" and pure(node) and all(n in nodes for n in inputs)
            reads[node] = any(reads.get(n, False) for n in inputs)
        if ok:
            nodes.add(node)
            heavy[node] = is_heavy(node) or any(heavy.get(n, False) for n in inputs)
    return nodes, reads, heavy


def same_size_in(node: fx.Node, sources: list[fx.Node]) -> tuple[fx.Node, int] | None:
    """(source input, dim) of the same symbolic size, for `sym_size(x, d)` of an input x that is not a source."""
    if node.target is not aten.sym_size.int or node.args[0] in sources:
        return None
    size = node.meta.get("val")
    for source in sources:
        val = source.meta.get("val")
        for dim, other in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if type(other) is type(size) and statically_known_true(other == size):
                return source, dim
    return None


def is_batch_first(val, batch) -> bool:
    return isinstance(val, torch.Tensor) and val.dim() > 0 and statically_known_true(val.shape[0] == batch)


def batch_first(nodes, worth: set, batch) -> set[fx.Node]:
    """`nodes`, each one whose dim 0 is not the batch replaced by what it is computed from: the saved step takes
    every prefix value with a dynamic batch in dim 0."""
    chosen = set()
    for node in nodes:
        if is_batch_first(node.meta.get("val"), batch):
            chosen.add(node)
        else:
            chosen |= batch_first([n for n in value_inputs(node) if n in worth], worth, batch)
    return chosen


def frontier(worth: set, decided: set) -> list[fx.Node]:
    """The values of `worth` that something outside `decided` reads."""
    return [n for n in worth if any(u not in decided for u in real_users(n))]


# Ops that only rearrange their first input's numbers (nothing computed), and those of them that repeat it
REARRANGES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                        aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int, aten.permute.default,
                        aten.clone.default, aten.alias.default, aten.repeat.default, aten.repeat_interleave.self_int})
REPEATS = frozenset({aten.expand.default, aten.repeat.default, aten.repeat_interleave.self_int})


def before_repeating(nodes: list[fx.Node], worth: set) -> list[fx.Node]:
    """Each node; or, where it repeats a value worth moving (SmolVLA's keys, repeated for each group of query
    heads), the value its rearranging ops (views, copies, repeats, no-op casts) start from. The prefix returns that
    value once, not its repeats, and the step repeats it: a copy the compiled step's rewrites drop
    (`fold_shared_kv`). A value only viewed (GR00T's transposed keys) moves as it is read: the step gets it with
    the strides it reads."""
    out = []
    for node in nodes:
        chain = [node]
        while _rearranges(chain[-1]) and chain[-1].args[0] in worth:
            chain.append(chain[-1].args[0])
        out.append(chain[-1] if any(n.target in REPEATS for n in chain[:-1]) else node)
    return list(dict.fromkeys(out))


def _rearranges(node: fx.Node) -> bool:
    return node.target in REARRANGES or noop_cast(node)  # SmolVLA's keys `.to(float32)`


def cone(moved: list[fx.Node], decided: set) -> set[fx.Node]:
    seen, stack = set(), list(moved)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(n for n in value_inputs(node) if n in decided)  # a size read off x_t: not x_t
    return seen


def labels(moved: list[fx.Node], decided: set, suffix: str = "") -> list[str]:
    """Each moved value's name and the linears its value holds that no earlier label named:
    "transpose_1 (action_head.….to_k)"."""
    order = {n: i for i, n in enumerate(moved[0].graph.nodes)} if moved else {}
    named, out = set(), []
    for node in moved:
        infos = [n.meta.get(QVLA_META) for n in sorted(cone([node], decided), key=order.__getitem__)]
        paths = [p for p in dict.fromkeys(i.module_path for i in infos if hasattr(i, "module_path")) if p not in named]
        named.update(paths)
        out.append((f"{node.name} ({', '.join(paths)})" if paths else node.name) + suffix)
    return out


def copy_into(prefix: fx.GraphModule, denoise: fx.GraphModule, needed: set, env: dict, size_of: Callable) -> dict:
    """Copies of the `needed` denoise nodes not already in `env` (denoise node → prefix node), appended to the prefix
    graph before its output in graph order, their shapes re-derived in the prefix graph's symbols; `size_of(node)`
    gives the prefix node for a size the step read off another input. Returns env, extended."""
    with prefix.graph.inserting_before(output_node(prefix)), fake_mode(prefix):  # for factories
        for node in denoise.graph.nodes:
            if node not in needed or node in env:
                continue
            if (size := size_of(node)) is not None:
                env[node] = size
            elif node.op == "get_attr":
                env[node] = adopted(prefix, attr_tensor(denoise, node.target), node.target)
            elif node.target is aten.type_as.default:  # what type_as computes: its second operand is not here
                env[node] = copy = prefix.graph.call_function(aten.to.dtype, (env[node.args[0]],
                                                                              node.meta["val"].dtype))
                copy.meta["val"] = fake_value(copy.target, copy.args)
            else:
                env[node] = copy = prefix.graph.node_copy(node, lambda n: env[n])
                copy.meta["val"] = fake_value(copy.target, copy.args, copy.kwargs)
    return env


def fake_mode(gm: fx.GraphModule):
    """The graph's fake mode as a context (factories made in it get fake values), or a null context."""
    return graph_fake_mode(gm) or contextlib.nullcontext()


def rerecord_schedules(*graphs: fx.GraphModule) -> None:
    """Compute moved between the graphs on purpose: their checked operator schedules follow it."""
    for gm in graphs:
        if SCHEDULE_KEY in gm.meta:
            record_schedule(gm)


def adopted(gm: fx.GraphModule, tensor: torch.Tensor, name: str) -> fx.Node:
    """A get_attr of `tensor` in gm (at the insertion point), registered by `adopt`, its meta["val"] set."""
    node = gm.graph.get_attr(adopt(gm, tensor, name))
    node.meta["val"] = attr_value(gm, tensor)
    return node


def adopt(gm: fx.GraphModule, tensor: torch.Tensor, name: str) -> str:
    """`tensor` (shared, not copied) registered on `gm` as `name`, or as `hoisted_<name>` where another tensor holds
    that name: a saved program's tensor names still say which linear they belong to."""
    while _has_attr(gm, name) and attr_tensor(gm, name) is not tensor:
        name = "hoisted_" + name.replace(".", "_")
    owner_path, _, leaf = name.rpartition(".")
    owner = gm
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


def output_node(gm: fx.GraphModule) -> fx.Node:
    return gm.graph.find_nodes(op="output")[0]


def return_more(prefix: fx.GraphModule, values: list[fx.Node]) -> None:
    """The prefix graph returns contiguous copies of `values` after its tuple: a moved value is often a view (a
    transposed K, a chunk of a modulation), and a compiled step reads its inputs with contiguous strides (AOTInductor
    without checking); a copy per sample, where a view would cost one per step."""
    out = output_node(prefix)
    with prefix.graph.inserting_before(out):
        values = [call(prefix, aten.clone.default, v, memory_format=torch.contiguous_format) for v in values]
    out.args = (type(out.args[0])((*out.args[0], *values)),)
    returned = _example(prefix.graph._codegen.pytree_info.out_spec)  # the prefix's tuple of tensors
    _respec(prefix, out_spec=pytree.tree_structure(type(returned)((*returned, *range(len(values))))))


def take_more(denoise: fx.GraphModule, moved: list[fx.Node], names: list[str]) -> list[fx.Node]:
    """A new prefix input per moved value (named `names`), after the existing prefix inputs, read where the value
    was; the recomputation is dropped. Returns the new inputs."""
    kinds = list(denoise.meta[INPUTS_KEY])
    placeholders = denoise.graph.find_nodes(op="placeholder")
    last = max(i for i, role in enumerate(kinds) if role == "prefix")
    new = []
    with denoise.graph.inserting_after(placeholders[last]):
        for node, name in reversed(list(zip(moved, names))):
            new.insert(0, denoise.graph.placeholder(name))
    for node, ph in zip(moved, new):
        ph.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(ph)
    denoise.meta[INPUTS_KEY] = (*kinds[:last + 1], *("prefix",) * len(moved), *kinds[last + 1:])
    drop_dead_code(denoise.graph)
    drop_unused_attributes(denoise)  # the moved weights live in the prefix graph now: saved once
    (prefix_values, *rest), kwargs = _example(denoise.graph._codegen.pytree_info.in_spec)  # ((prefix…), x, t), {}
    more = type(prefix_values)((*prefix_values, *range(len(moved))))
    _respec(denoise, in_spec=pytree.tree_structure(((more, *rest), kwargs)))
    return new


def _example(spec):
    return pytree.tree_unflatten(list(range(spec.num_leaves)), spec)


def _respec(gm: fx.GraphModule, *, in_spec=None, out_spec=None) -> None:
    info = gm.graph._codegen.pytree_info
    gm.graph._codegen.pytree_info = info._replace(in_spec=in_spec or info.in_spec, out_spec=out_spec or info.out_spec)
    gm.graph.lint()
    gm.recompile()
