"""bf16 matrix products computed in fp32, for the runs a compile makes of a bf16 policy on CPUs without native bf16.

The full presets are built in bf16 (half the memory), so capture's reference run, every calibration batch and the
fidelity run multiply bf16 tensors. Where the CPU has no bf16 arithmetic (AVX2-only: no AVX512-BF16, no AMX) torch
emulates bf16 GEMMs, 1.6–6× slower than converting both operands to fp32 and multiplying there (AVX2 EPYC, 2 threads,
M×K×N from 32×1536×6144 to 912×2048×6144; benchmarks/RESULTS.md §14c). A bf16 GEMM accumulates in fp32 and rounds
its output to bf16 once; so does this, so the two agree up to fp32 summation order (tests/kernels/test_bf16_gemms.py).
Only the listed product ops change; every other op, and every op on fp32 tensors, runs as it is.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten
PRODUCTS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                      aten.convolution.default, aten._scaled_dot_product_flash_attention_for_cpu.default})


def native_bf16() -> bool:
    """Does this CPU have the AVX512-BF16 or AMX instructions? (Not oneDNN's "bf16 supported", which is also true
    where it emulates bf16 on plain AVX512, 3-4.5x slower than fp32 there: Ice Lake, RESULTS §1g.)"""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


class Fp32Products(TorchDispatchMode):
    """Inside: a product op (PRODUCTS) with a bf16 CPU operand runs in fp32 and returns what the bf16 op would
    (same dtypes, rounded once). `upcast` counts the products it ran in fp32."""

    supports_higher_order_operators = True  # flex_attention & co. pass through, run as they are

    def __init__(self):
        super().__init__()
        self.upcast = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS or not _has_bf16_cpu((args, kwargs)):
            return func(*args, **kwargs)
        self.upcast += 1
        want = func(*tree_map(_as_meta, args), **tree_map(_as_meta, kwargs))  # the dtypes the bf16 op returns
        got = func(*tree_map(_upcast, args), **tree_map(_upcast, kwargs))
        return tree_map(lambda g, w: g.to(w.dtype) if isinstance(g, torch.Tensor) else g, got, want)


def fp32_products(*modules: torch.nn.Module) -> contextlib.AbstractContextManager:
    """`Fp32Products()` where `modules` hold bf16 CPU tensors that a product may read and the CPU has no native
    bf16, else nothing (the mode costs every op a Python dispatch: 20% of a pi05-small W4A8 run): use around eager
    runs of possibly-bf16 programs. In a graph, a bf16 constant read only by qvla:: ops (4-bit weights' group
    scales) reaches no product."""
    tensors = [t for m in modules for t in _product_operands(m)]
    return Fp32Products() if _has_bf16_cpu(tensors) and not native_bf16() else contextlib.nullcontext()


def _product_operands(module: torch.nn.Module):
    from qvla_compiler.passes._graph import attr_tensor  # passes import kernels: not at module level

    if not isinstance(module, torch.fx.GraphModule):
        return [*module.parameters(), *module.buffers()]
    return [attr_tensor(module, n.target) for n in module.graph.find_nodes(op="get_attr")
            if any(not str(u.target).startswith("qvla.") for u in n.users)]


def _has_bf16_cpu(tree) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
               for t in torch.utils._pytree.tree_leaves(tree))


def _upcast(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _as_meta(x):
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x
