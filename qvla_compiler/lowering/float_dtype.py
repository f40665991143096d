"""The float part of an integer program in bf16 (or fp16): a lowering for CPUs with native bf16 GEMMs.

Before: y = aten.linear(x, W, b) with W, b fp32 buffers (a linear the layout keeps float).
After:  y = aten.linear(x.to(dtype), W', b').to(x.dtype) with W', b' stored in `dtype` (half the bytes).
Only linears whose weight is a get_attr read by linears alone are cast; quantized linears are qvla:: ops by then
and untouched. Worth it only where the CPU multiplies bf16 natively (AVX512-BF16, AMX): `native_bf16()`; on an
AVX2-only CPU bf16 GEMMs are emulated and slower than fp32 (RESULTS §1, bf16 inductor row).
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from qvla_compiler.kernels.bf16_gemms import native_bf16
from qvla_compiler.passes import _graph as g

aten = torch.ops.aten
FLOAT_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # a recipe's float_dtype -> the dtype the float linears run in


def cast_float_linears(gm: fx.GraphModule, dtype: torch.dtype | str = torch.bfloat16) -> list[str]:
    """Run every remaining float aten.linear in `dtype` (a torch dtype, or a recipe's float_dtype: "fp32" leaves the
    graph as it is); returns the weight names cast (stored in `dtype`)."""
    dtype = FLOAT_DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype is None:
        return []
    if dtype == torch.bfloat16 and not native_bf16():
        warnings.warn("float linears in bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): bf16 GEMMs are emulated "
                      "here and run slower than fp32; use float_dtype 'fp32' on this machine", stacklevel=2)
    cast: list[str] = []
    done: set[str] = set()
    for node in g.linear_nodes(gm):
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        params = [p for p in (w, bias) if p is not None]
        if not all(isinstance(p, fx.Node) and p.op == "get_attr" and _float(gm, p.target) for p in params):
            continue
        if any(not g.is_linear(user) for p in params for user in p.users):
            continue  # a weight also read elsewhere keeps its dtype
        for p in params:
            if p.target not in done:
                g.replace_attr_tensor(gm, p.target, g.attr_tensor(gm, p.target).to(dtype))
                done.add(p.target)
        out_dtype = node.meta["val"].dtype if "val" in node.meta else torch.float32
        with gm.graph.inserting_before(node):
            xc = gm.graph.call_function(aten.to.dtype, (x, dtype))
            new = gm.graph.call_function(aten.linear.default, (xc, w, bias) if bias is not None else (xc, w))
        with gm.graph.inserting_after(new):
            back = gm.graph.call_function(aten.to.dtype, (new, out_dtype))
        node.replace_all_uses_with(back)
        gm.graph.erase_node(node)
        cast.append(w.target)
    gm.graph.lint()
    gm.recompile()
    return cast


def _float(gm: fx.GraphModule, target: str) -> bool:
    t = g.attr_tensor(gm, target)
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32
