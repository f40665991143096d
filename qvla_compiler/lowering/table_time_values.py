"""What every denoise step computes from its time input alone is computed for all the schedule's timesteps at once,
in the prefix graph, and each step reads its row of that table.

Before: the step recomputes g(t) at each of the sampler's S timesteps, e.g. GR00T's timestep MLP and every block's
AdaLN modulation linear (83M of groot-full's 508M step weights), pi0.5's time MLP and adaRMS modulations:
    prefix(obs) -> (p…)               denoise((p…), x, t) -> v,  reading g(t)
After, with T = (t_1 … t_S) the schedule's timesteps in the step input's dtype:
    prefix(obs) -> (p…, G…)           G = g(T) expanded to [B, S, …]: one batch of S rows whatever B, each
                                      weight read once per sample instead of once per step (or never at run time:
                                      g(T) reads the schedule and the weights alone, and a compile path folds it)
    denoise((p…, G…), x, t) -> v      reading G[b, k] where T[k] == t[b] (T distinct); a t that is not one of T
                                      fails loudly (`_assert_async`) rather than read another step's row
Which values: only pure ops move; only values whose every op maps row i of its inputs to row i of its output
(elementwise on operands of the output's rank, a reduction, norm or concat off dim 0, a view keeping the batch in
dim 0, a linear on its input rows, a qvla:: op), so the S-row batch gives each row what its step alone gives; only
values holding a GEMM-like op; only values with the batch in dim 0. A value read as `t[0]`, broadcast across the
batch, summed over it or mixed with x stays in the step.
Invariant: where the tabled GEMMs are integer (qvla::), every output is bit-identical (tested exactly): an integer
product is exact whatever the row count. An fp32 GEMM of S rows may sum in another order than one of B rows, so a
tabled float linear (GR00T's and pi0.5's modulation linears, float in the default layout) equals its per-step value
to the GEMM's rounding only; a quantized program downstream rounds that difference like any other (measured in
benchmarks/RESULTS.md §1i). `float_gemms=False` keeps those in the step: a program with nothing quantized keeps the
float policy's bits. The sampler passes the prefix tuple to every step unchanged.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from qvla_compiler.lowering import _between_graphs as between
from qvla_compiler.passes._graph import call, is_pointwise

aten = torch.ops.aten
STEPS_NAME = "qvla_timesteps"  # the schedule's timesteps, a buffer of both graphs
VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                   aten.clone.default, aten.contiguous.default, aten._to_copy.default, aten.to.dtype,
                   aten.alias.default, aten.detach.default, aten.type_as.default})
TRAILING_NORMS = frozenset({aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
                            aten.group_norm.default})  # over the trailing dims (group_norm: dims 1…, per row)
DIM_ARGUMENTS = ("dim", "dims", "dim0", "dim1")
UNSEEN_TIME = "qvla: the denoise step was called with a time that is not one of the schedule's timesteps it was " \
              "compiled for; drive it with the program's own sampler (the schedule is in the artifact's meta)"


def table_time_values(prefix: fx.GraphModule, denoise: fx.GraphModule, timesteps: tuple[float, ...], *,
                      float_gemms: bool = True) -> list[str]:
    """Rewrite both graphs in place; returns each tabled value's label ("linear_3 (….norm1.linear) per timestep").
    float_gemms=False: only values computed exactly whatever the row count (every GEMM integer)."""
    times = between.inputs_of_role(denoise, "time")
    val = times[0].meta.get("val") if len(times) == 1 else None
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or len(set(timesteps)) != len(timesteps):
        return []
    t, batch = times[0], val.shape[0]
    size_source = functools.partial(between.same_size_in, sources=[t])
    decided, reads_time, heavy = between.decided_by(denoise, "time", size_source)
    qualifies = _row_wise(denoise, decided, reads_time, batch, float_gemms)
    worth = {n for n in decided if reads_time[n] and heavy[n] and qualifies[n] and _rest_static(n)}
    moved = [n for n in denoise.graph.nodes if n in between.batch_first(between.frontier(worth, decided), worth,
                                                                         batch)]
    rows = next((p for p in between.inputs_of_role(denoise, "prefix")
                 if between.is_batch_first(p.meta.get("val"), batch)), None)
    prefix_out = between.output_node(prefix).args[0]
    if not moved or rows is None or len(between.inputs_of_role(denoise, "prefix")) != len(prefix_out):
        return []
    labels = between.labels(moved, decided, " per timestep")
    steps = torch.tensor(timesteps, dtype=val.dtype, device=val.device)
    source = prefix_out[between.inputs_of_role(denoise, "prefix").index(rows)]
    tables = _compute_tables(prefix, denoise, between.cone(moved, decided), moved, t, size_source, steps, source)
    between.return_more(prefix, tables)
    _read_rows(denoise, moved, t, steps)
    between.rerecord_schedules(prefix, denoise)
    return labels


def _row_wise(gm: fx.GraphModule, decided: set, reads_time: dict, batch, float_gemms: bool) -> dict[fx.Node, bool]:
    """row_wise[node]: every op from the time input to node maps rows to rows (and none is a float GEMM, unless
    float_gemms)."""
    row_wise: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node in decided:
            own = node.op != "call_function" or not reads_time[node] or _maps_rows(node, batch, reads_time)
            row_wise[node] = (own and (float_gemms or node.target not in between.HEAVY)
                              and all(row_wise.get(n, True) for n in between.value_inputs(node)))
    return row_wise


def _maps_rows(node: fx.Node, batch, reads_time: dict) -> bool:
    """Row i of node's output reads only row i of its time-dependent inputs, the batch in dim 0 of all of them."""
    val = node.meta.get("val")
    vals = list(val) if isinstance(val, (list, tuple)) else [val]
    if not all(isinstance(v, torch.Tensor) for v in vals):  # a size: the batch's, or arithmetic on it
        return node.target in between.SIZE_ARITHMETIC or node.target is aten.sym_size.int
    timed = [n for n in between.value_inputs(node) if reads_time.get(n)]
    timed_vals = torch.utils._pytree.tree_leaves([n.meta.get("val") for n in timed])
    if not all(between.is_batch_first(v, batch) for v in vals + timed_vals):
        return False
    target = node.target
    if is_pointwise(node):  # broadcasting aligns trailing dims: the batch stays in dim 0 only at the output's rank
        return all(v.dim() == vals[0].dim() for v in timed_vals)
    if target is operator.getitem or getattr(target, "namespace", None) == "qvla" or target in VIEWS \
            or target in TRAILING_NORMS:
        return True
    if target is aten.linear.default or target is aten.embedding.default:  # rows of the input; weights constant
        return timed == [node.args[1] if target is aten.embedding.default else node.args[0]]
    return _off_dim_zero(node)


def _off_dim_zero(node: fx.Node) -> bool:
    """An op with dim arguments, none of them the batch dim (a full slice of it passes: `t[:, None]`)."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema else []
    if not any(name in DIM_ARGUMENTS for name in names):
        return False
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip(names, node.args), **node.kwargs)
    rank = _rank(node)
    if node.target is aten.permute.default:
        return bound["dims"][0] % rank == 0
    if node.target is aten.slice.Tensor and bound["dim"] % rank == 0:
        return bound["start"] in (None, 0) and bound["step"] == 1 and statically_known_true(
            node.meta["val"].shape[0] == node.args[0].meta["val"].shape[0])
    dims = [bound[name] for name in DIM_ARGUMENTS if name in bound]
    flat = [d for dim in dims for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    return bool(flat) and None not in flat and all(d % rank != 0 for d in flat)


def _rank(node: fx.Node) -> int:
    """The rank a dim argument of node counts in: the output's for unsqueeze, else the first tensor input's."""
    if node.target is aten.unsqueeze.default:
        return node.meta["val"].dim()
    first = torch.utils._pytree.tree_leaves(node.args)[0]
    return max(first.meta["val"].dim(), 1)


def _rest_static(node: fx.Node) -> bool:
    """The dims after the batch are plain ints: the table's shape is [B, S, *those]."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape[1:])


def _compute_tables(prefix, denoise, needed: set, moved, t, size_source, steps, source) -> list[fx.Node]:
    """In the prefix graph: the moved values' cone (`needed`) on the S rows of T, whatever the batch, each [S, …]
    expanded to [B, S, …]; a size of the step equal to its batch (`size_source`) becomes S. The cone reads the
    schedule and the weights alone, so a compile path folds it into constants (`precompute_factories`)."""
    with prefix.graph.inserting_before(between.output_node(prefix)), between.fake_mode(prefix):
        steps_node = between.adopted(prefix, steps, STEPS_NAME)
        rows = call(prefix, aten.sym_size.int, source, 0)
    env = between.copy_into(prefix, denoise, needed, {t: steps_node},
                            lambda node: len(steps) if size_source(node) is not None else None)
    with prefix.graph.inserting_before(between.output_node(prefix)), between.fake_mode(prefix):
        return [call(prefix, aten.expand.default, call(prefix, aten.unsqueeze.default, env[n], 0),
                     [rows, len(steps), *n.meta["val"].shape[1:]]) for n in moved]


def _read_rows(denoise: fx.GraphModule, moved: list[fx.Node], t: fx.Node, steps: torch.Tensor) -> None:
    """The step reads G[b, k] with T[k] == t[b] in place of each moved value, asserting that such a k exists."""
    shapes = [n.meta["val"] for n in moved]
    tables = between.take_more(denoise, moved, [f"timed_{n.name}" for n in moved])
    after_inputs = denoise.graph.find_nodes(op="placeholder")[-1].next  # nodes inserted before it keep their order
    with denoise.graph.inserting_before(after_inputs), between.fake_mode(denoise):
        for table, old in zip(tables, shapes):
            table.meta["val"] = old.new_empty((old.shape[0], len(steps), *old.shape[1:]))
        steps_node = between.adopted(denoise, steps, STEPS_NAME)
        hit = call(denoise, aten.eq.Tensor, call(denoise, aten.unsqueeze.default, t, 1), steps_node)
        found = call(denoise, aten.all.default, call(denoise, aten.any.dim, hit, 1))
        denoise.graph.call_function(aten._assert_async.msg, (found, UNSEEN_TIME))
        for table in tables:  # the one hit row, summed with zeros: exact
            hits = call(denoise, aten.view.default, hit, [-1, len(steps), *[1] * (table.meta["val"].dim() - 2)])
            masked = call(denoise, aten.where.ScalarOther, hits, table, 0)
            row = call(denoise, aten.sum.dim_IntList, masked, [1], dtype=table.meta["val"].dtype)
            table.replace_all_uses_with(row, delete_user_cb=lambda user, masked=masked: user is not masked)
    denoise.graph.lint()
    denoise.recompile()

