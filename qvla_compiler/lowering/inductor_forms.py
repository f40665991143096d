"""The forms Inductor compiles faster, written into the copy of a graph that a compile path hands to it.

Each rewrite keeps the graph's values in exact arithmetic (see its module) and runs only on that copy: the saved
program keeps its original ops, so its eager form and its exported graphs are unchanged. `compile_program`,
`aot_package` and the `qvla` backend all compile `for_inductor(graph)`.
"""
from __future__ import annotations

from copy import deepcopy

import torch
import torch.fx as fx

from qvla_compiler.lowering.fold_shared_kv import fold_shared_kv
from qvla_compiler.lowering.fuse_attention import fuse_attention
from qvla_compiler.lowering.gelu_as_sigmoid import gelu_as_sigmoid
from qvla_compiler.lowering.patch_convs_as_gemms import patch_convs_as_gemms
from qvla_compiler.lowering.precompute_factories import precompute_factories
from qvla_compiler.lowering.transpose_float_weights import transpose_float_weights

# each: (graph module) -> how many places it rewrote, in place; fold_shared_kv also folds what fuse_attention wrote
REWRITES = (fuse_attention, fold_shared_kv, gelu_as_sigmoid, precompute_factories, transpose_float_weights,
            patch_convs_as_gemms)


def for_inductor(gm: fx.GraphModule) -> fx.GraphModule:
    """A rewritten copy of `gm`'s graph over the same tensors, or `gm` itself when no rewrite applies (`gm` is kept)."""
    copy, counts = _rewritten(gm)
    return copy if sum(counts.values()) else gm


def rewrite_counts(gm: fx.GraphModule) -> dict[str, int]:
    """What `for_inductor` does to `gm`, for `qvla inspect`: how many places each rewrite changed, the attentions
    the compiled copy runs as one SDPA, and the explicit softmaxes left as written (a form no rewrite takes)."""
    copy, counts = _rewritten(gm)
    left = {"sdpa": torch.ops.aten.scaled_dot_product_attention.default, "softmax_left": torch.ops.aten.softmax.int}
    return {**counts, **{k: len(copy.graph.find_nodes(op="call_function", target=op)) for k, op in left.items()}}


def _rewritten(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
    copy = fx.GraphModule(gm, deepcopy(gm.graph))
    return copy, {rewrite.__name__: rewrite(copy) for rewrite in REWRITES}
