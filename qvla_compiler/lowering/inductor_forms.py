"""The forms Inductor compiles faster, written into the copy of a graph that a compile path hands to it.

Each rewrite keeps the graph's values in exact arithmetic (see its module) and runs only on that copy: the saved
program keeps its original ops, so its eager form and its exported graphs are unchanged. `compile_program`,
`aot_package` and the `qvla` backend all compile `for_inductor(graph)`.
"""
from __future__ import annotations

from copy import deepcopy

import torch.fx as fx

from qvla_compiler.lowering.fold_shared_kv import fold_shared_kv
from qvla_compiler.lowering.fuse_attention import fuse_attention
from qvla_compiler.lowering.gelu_as_sigmoid import gelu_as_sigmoid

# each: (graph module) -> how many places it rewrote, in place; fold_shared_kv also folds what fuse_attention wrote
REWRITES = (fuse_attention, fold_shared_kv, gelu_as_sigmoid)


def for_inductor(gm: fx.GraphModule) -> fx.GraphModule:
    """A rewritten copy of `gm`'s graph over the same tensors, or `gm` itself when no rewrite applies (`gm` is kept)."""
    copy = fx.GraphModule(gm, deepcopy(gm.graph))
    return copy if sum(rewrite(copy) for rewrite in REWRITES) else gm
