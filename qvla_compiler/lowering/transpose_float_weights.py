"""Float linears' weights stored transposed ([K, N], contiguous), in the graphs the compile paths hand to Inductor.

Before:
    y = linear(x, W, b)                 W: a constant [N, K] read by linears alone
After:
    y = matmul(x, Wᵀ) + b               Wᵀ: a new constant [K, N], contiguous (W itself is dropped from the copy)
Invariant: the same function in exact arithmetic, and the same bytes of weights (each W is replaced, not copied).
Weights that anything but a linear's weight operand reads (a tied embedding, a weight used as an activation) stay as
they are.
Why: an AOTInductor package (with runtime constant folding, qvla's `--aot` default) does not prepack float weights:
its C++ calls `addmm(b, x, W.t())`, a transposed view, and MKL's sgemm is 1.2–1.8× slower on that operand than on a
contiguous [K, N] one at the action head's shapes (49×384×384: 117 vs 96 µs; 49×1024×256: 257 vs 186 µs), where a
JIT compile's prepacked MKL weight takes about the contiguous operand's time (RESULTS §1m). The saved program keeps
the original ops.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qvla_compiler.lowering._between_graphs import adopted
from qvla_compiler.passes._graph import attr_tensor, call, drop_attribute, rewrite_each

aten = torch.ops.aten
FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def transpose_float_weights(gm: fx.GraphModule) -> int:
    """Rewrite every float linear whose weight only linears read, in place; returns how many linears."""
    weights = [w for w in gm.graph.find_nodes(op="get_attr") if _transposable(gm, w)]
    count = sum(len(w.users) for w in weights)
    rewrite_each(gm, [(w,) for w in weights], _rewrite)
    return count


def _transposable(gm: fx.GraphModule, weight: fx.Node) -> bool:
    tensor = attr_tensor(gm, weight.target)
    return (isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.dtype in FLOAT and bool(weight.users)
            and all(u.target is aten.linear.default and len(u.args) > 1 and u.args[1] is weight
                    and weight not in (u.args[0], *u.args[2:], *u.kwargs.values()) for u in weight.users))


def _rewrite(gm: fx.GraphModule, weight: fx.Node) -> None:
    tensor = attr_tensor(gm, weight.target)
    with gm.graph.inserting_before(weight):
        transposed = adopted(gm, tensor.detach().t().contiguous(), f"{weight.target}_t")
    for linear in list(weight.users):
        x, bias = linear.args[0], (linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias"))
        with gm.graph.inserting_before(linear):
            out = call(gm, aten.matmul.default, x, transposed)
            if bias is not None:
                out = call(gm, aten.add.Tensor, out, bias)
        out.meta = {**linear.meta, "val": out.meta["val"]}
        linear.replace_all_uses_with(out)
        gm.graph.erase_node(linear)
    drop_attribute(gm, weight)  # replaced, not copied
