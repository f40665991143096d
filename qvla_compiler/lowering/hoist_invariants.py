"""What every denoise step recomputes from the prefix alone moves into the prefix graph, computed once per sample.

Before: the denoise graph reads the prefix outputs p and recomputes f(p) at every one of the sampler's steps, e.g.
GR00T's cross-attention keys and values of the VL features (`to_k(vl)`, `to_v(vl)`), float or integer:
    prefix(obs) -> (p0 … pn)              denoise((p0 … pn), x, t) -> v,  reading f(p) for some pure f
After:
    prefix(obs) -> (p0 … pn, f(p) …)      denoise((p0 … pn, f(p) …), x, t) -> v,  f's nodes gone from it
Invariant: the same ops on the same values, so every output is bit-identical (tested exactly). Only pure ops that
read no action or time input move (a per-step scale gathered by t stays in the step); only values whose computation
holds a GEMM, attention or qvla:: op (a cheap view or mask stays where it is, costing no memory); only values with
the batch in dim 0 (what the saved step's dynamic batch takes; otherwise what they are computed from moves); keys
repeated for each group of query heads (SmolVLA) move unrepeated, and the step repeats them.
Why: GR00T's DiT cross-attends to the VL features in half its blocks (SmolVLA's expert to the VLM's keys and values
likewise); at groot-full's shapes those projections are about half the step's multiply-adds. The sampler passes the
prefix tuple to the step unchanged, so a saved program, its AOT package and `module()` run the hoisted pair as they
ran the original.
"""
from __future__ import annotations

import functools

import torch.fx as fx

from qvla_compiler.lowering import _between_graphs as between
from qvla_compiler.passes._graph import call


def hoist_invariants(prefix: fx.GraphModule, denoise: fx.GraphModule) -> list[str]:
    """Rewrite both graphs in place; returns what the prefix now returns for the step: each value's node name and
    the linears it holds ("transpose_1 (action_head.transformer_blocks.0.attn1.to_k)")."""
    sources = between.inputs_of_role(denoise, "prefix")
    size_source = functools.partial(between.same_size_in, sources=sources)
    invariant, reads_prefix, heavy = between.decided_by(denoise, "prefix", size_source)
    worth = {n for n in invariant if reads_prefix[n] and heavy[n]}
    batch = next((p.meta["val"].shape[0] for p in between.inputs_of_role(denoise, "action")), None)
    chosen = between.batch_first(between.before_repeating(between.frontier(worth, invariant), worth), worth, batch)
    moved = [n for n in denoise.graph.nodes if n in chosen]  # graph order: a saved program's bytes are reproducible
    if not moved or len(sources) != len(between.output_node(prefix).args[0]):
        return []
    labels = between.labels(moved, invariant)
    env = dict(zip(sources, between.output_node(prefix).args[0]))  # the step's prefix inputs, in order

    def size_of(node):  # a size of x_t that a prefix input has too: read off that input in the prefix graph
        size = size_source(node)
        return None if size is None else call(prefix, between.aten.sym_size.int, env[size[0]], size[1])

    env = between.copy_into(prefix, denoise, between.cone(moved, invariant), env, size_of)
    between.return_more(prefix, [env[n] for n in moved])
    between.take_more(denoise, moved, [f"hoisted_{n.name}" for n in moved])
    between.rerecord_schedules(prefix, denoise)
    return labels
