"""Bound every integer linear's accumulator; record whether its K must be split, refuse what no kernel can split.

Before: aten.linear nodes annotated with an integer LinearInfo.spec (quantize_linears has run).
After:  the same graph; each integer linear carries node.meta["qvla_acc"] = AccumulatorBound: K, the magnitude
        bounds qmax_a and qmax_w (a 4-bit weight reaches -8), the worst |accumulator| K * qmax_a * qmax_w, the
        longest K-chunk whose int32 sum cannot overflow, and whether K must be split. The kernels split such a K
        themselves (cpu_gemm and the Triton launchers sum exact int32 chunks in int64); the one unit none splits, an
        int4 weight group (int32 inside a group, one scale per group), raises AccumulatorOverflowError when it could
        overflow.
Invariant: no integer linear is lowered with an int32 accumulator that can overflow. M (batch x tokens) may be
        symbolic in the exported graph; it does not enter the bound, since every output element is one K-term dot.
"""
from __future__ import annotations

import dataclasses

import sympy
import torch.fx as fx

from qvla_compiler.errors import AccumulatorOverflowError
from qvla_compiler.kernels.cpu_gemm import INT4_MAG, INT8_MAG, INT32_MAX
from qvla_compiler.kernels.ops import qmax_for
from qvla_compiler.passes import _graph as g
from qvla_compiler.quant.quantizers import weight_low

ACC_META = "qvla_acc"
K, QA, QW = sympy.symbols("K q_a q_w", integer=True, positive=True)
WORST_ACC = K * QA * QW  # |sum_k a_k w_k| <= K * max|a| * max|w|, reached when every product is +-max
MAX_CHUNK = sympy.floor(INT32_MAX / (QA * QW))  # the largest K with WORST_ACC <= 2**31 - 1
# An int4 group is summed in int32 by the Triton kernel for any int8-container input: |a| <= 128, |w| <= 8.
INT4_GROUP_LIMIT = int(MAX_CHUNK.subs({QA: INT8_MAG, QW: INT4_MAG}))


@dataclasses.dataclass(frozen=True)
class AccumulatorBound:
    """What check_accumulator_bounds proved about one integer linear."""

    k: int
    qmax_a: int
    qmax_w: int
    worst: int  # K * qmax_a * qmax_w: the largest |accumulator| the quantized values allow
    max_chunk_k: int  # the longest K-chunk whose int32 sum cannot overflow
    needs_k_split: bool  # worst > 2**31 - 1: the kernels must (and do) sum int32 chunks in int64


def check_accumulator_bounds(gm: fx.GraphModule) -> fx.GraphModule:
    for node in g.linear_nodes(gm):
        info = node.meta.get("qvla")
        if info is None or not info.is_quantized:
            continue
        spec = info.spec
        bound = accumulator_bound(info.in_features, qmax_for(spec.a_bits), -weight_low(spec.w_bits))
        if spec.w_bits < 8:  # grouped weights; the 2-/3-bit ones run in the int4 kernel on GPU
            _check_int4_group(info.module_path, info.in_features, spec.group_size)
        node.meta[ACC_META] = bound
    return gm


def accumulator_bound(k: int, qmax_a: int, qmax_w: int) -> AccumulatorBound:
    values = {K: k, QA: qmax_a, QW: qmax_w}
    worst, chunk = int(WORST_ACC.subs(values)), int(MAX_CHUNK.subs(values))
    return AccumulatorBound(k, qmax_a, qmax_w, worst, chunk, worst > INT32_MAX)


def _check_int4_group(path: str, k: int, group_size: int) -> None:
    if group_size <= 0 or group_size >= k:  # one group per row: the kernels chunk K themselves
        return
    if group_size > INT4_GROUP_LIMIT:
        raise AccumulatorOverflowError(
            f"check_accumulator_bounds: {path} (K={k}) uses int4 groups of {group_size}; one group's int32 "
            f"accumulator can reach {group_size} * 128 * 8, past 2**31 - 1, and no kernel splits a group. Use "
            f"group_size <= {INT4_GROUP_LIMIT}, or group_size=-1 (per channel, which the kernels chunk).")
