"""The float part of an integer program in bf16 (or fp16): a lowering for CPUs with native bf16 GEMMs.

Linears the layout keeps float:
  before: y = aten.linear(x, W, b) with W, b fp32 buffers;
  after:  y = aten.linear(x.to(dtype), W', b').to(x.dtype) with W', b' stored in `dtype` (half the bytes).
Only linears whose weight is a get_attr read by linears alone are cast; quantized linears are qvla:: ops by then
and untouched.
Attention products (a product of two activations, q·kᵀ and p·v, or a scaled_dot_product_attention):
  before: s = matmul(q, k) in fp32;
  after:  s = matmul(q.to(dtype), k.to(dtype)).to(fp32): the softmax and everything else stay fp32.
Worth it only where the CPU multiplies bf16 natively (AVX512-BF16, AMX): `native_bf16()`; on an AVX2-only CPU bf16
GEMMs are emulated and slower than fp32 (RESULTS §1, bf16 inductor row).
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from qvla_compiler.kernels.bf16_gemms import native_bf16
from qvla_compiler.passes import _graph as g

aten = torch.ops.aten
FLOAT_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # a recipe's float_dtype -> the dtype the float linears run in


def cast_float_part(gm: fx.GraphModule, dtype: torch.dtype | str = torch.bfloat16) -> list[str]:
    """Run the float linears and the attention products in `dtype` (a torch dtype, or a recipe's float_dtype: "fp32"
    leaves the graph as it is); returns the weight names cast (stored in `dtype`)."""
    dtype = FLOAT_DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype is None:
        return []
    if dtype == torch.bfloat16 and not native_bf16():
        warnings.warn("float linears in bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): bf16 GEMMs are emulated "
                      "here and run slower than fp32; use float_dtype 'fp32' on this machine", stacklevel=2)
    cast = cast_float_linears(gm, dtype)
    cast_attention_products(gm, dtype)
    return cast


def cast_attention_products(gm: fx.GraphModule, dtype: torch.dtype) -> int:
    """Every fp32 product of two activations (matmul / bmm / einsum / SDPA: q·kᵀ, p·v) computed in `dtype`, its
    output cast back to fp32; returns how many. Products with a constant operand are linears, not attention."""
    products = [n for n in gm.graph.nodes if _attention_product(n)]
    for node in products:
        with gm.graph.inserting_before(node):
            node.args = tuple(_cast_arg(gm, a, dtype) for a in node.args)
            node.kwargs = {k: _cast_arg(gm, a, dtype) for k, a in node.kwargs.items()}
        with gm.graph.inserting_after(node):
            back = gm.graph.call_function(aten.to.dtype, (node, torch.float32))
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    gm.graph.lint()
    gm.recompile()
    return len(products)


def _attention_product(node: fx.Node) -> bool:
    operands = g.matmul_operands(node)
    if operands is None and g.is_sdpa(node):
        operands = node.args[:3]
    if operands is None or "val" not in node.meta or node.meta["val"].dtype != torch.float32:
        return False
    return all(isinstance(a, fx.Node) and not g.is_constant(a) for a in operands)


def _cast_arg(gm: fx.GraphModule, arg, dtype: torch.dtype):
    """`arg` cast to `dtype` when it is an fp32 tensor node (a bool mask or a scalar is left as it is)."""
    if isinstance(arg, (list, tuple)):
        return type(arg)(_cast_arg(gm, a, dtype) for a in arg)
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return arg
    return gm.graph.call_function(aten.to.dtype, (arg, dtype))


def cast_float_linears(gm: fx.GraphModule, dtype: torch.dtype) -> list[str]:
    """Run every remaining float aten.linear in `dtype`; returns the weight names cast (stored in `dtype`)."""
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
                _set_attr(gm, p.target, _get_attr(gm, p.target).to(dtype))
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


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _float(gm: fx.GraphModule, target: str) -> bool:
    t = _get_attr(gm, target)
    return isinstance(t, torch.Tensor) and t.dtype == torch.float32


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)
