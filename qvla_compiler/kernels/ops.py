"""The `qvla::` integer ops: schema, CPU integer implementation, fake (meta) implementation and pure-torch reference.

A quantized linear is two ops, so one activation quantization can feed every consumer of the same tensor
(q/k/v share one, gate/up share one):

    xq, xs = qvla::quantize_act(x, bits, static_scale)          # per-token (or static per-tensor) symmetric
    y      = qvla::int8_linear(xq, xs, w_q, w_scale, bias, dtype)  # int8 x int8 -> int32, scales in the epilogue
    y      = qvla::int4_linear(xq, xs, w_packed, w_scale, bias, group_size, dtype)

The CPU implementations do exact integer arithmetic (int32 accumulators, K-split with int64 sums past 131,071 terms
so no K overflows; `kernels/cpu_gemm.py` picks `torch._int_mm` or an exact chunked fp32 GEMM, whichever is fast on
this CPU); int4 weights are unpacked to int8 on the fly and accumulated per group of `group_size` along K.
Non-finite activations propagate as in float: quantize_act gives the token a NaN scale, which the epilogue multiplies
in. The GPU implementations (Triton)
register themselves for the "cuda" dispatch key on top of these schemas, so one saved program runs on both.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from qvla_compiler.errors import ShapeError
from qvla_compiler.kernels import cpu_gemm
from qvla_compiler.kernels.cpu_gemm import grouped_int_matmul
from qvla_compiler.meta import QuantSpec

_LIB = "qvla"


def qmax_for(bits: int) -> int:
    """Largest magnitude of a symmetric signed `bits`-bit integer: 127 for 8, 7 for 4."""
    return 2 ** (bits - 1) - 1


# --------------------------------------------------------------------------------------------------------------
# int4 packing: two signed nibbles per byte along K; low nibble = even k, high nibble = odd k.
# --------------------------------------------------------------------------------------------------------------
def pack_int4(w: torch.Tensor) -> torch.Tensor:
    """int8 tensor [N, K] with values in [-8, 7] -> int8 [N, ceil(K/2)] (odd K: last high nibble is 0)."""
    if w.shape[-1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    lo, hi = w[..., 0::2], w[..., 1::2]
    return ((lo & 0x0F) | (hi << 4)).to(torch.int8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4; sign-extends each nibble by shifting it to the top of an int8 and back."""
    lo = (packed << 4) >> 4  # int8 arithmetic shift sign-extends the low nibble
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :k]


# --------------------------------------------------------------------------------------------------------------
# quantize_act
# --------------------------------------------------------------------------------------------------------------
def quantize_act_ref(x: torch.Tensor, bits: int, static_scale: torch.Tensor | None = None):
    """Reference. A row holding a NaN or Inf gets a NaN scale (its q is unspecified), so every output of that token
    is NaN, as in float; a static scale alone would turn such a row into finite garbage. Finite rows: scale + 0."""
    qmax = qmax_for(bits)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if x.shape[-1] else xf.new_zeros((*x.shape[:-1], 1))
    if static_scale is None:
        scale = (amax / qmax).clamp_min(1e-8)
    else:
        scale = static_scale.float().expand(*x.shape[:-1], 1)
    q = torch.clamp(torch.round(xf / scale), -qmax, qmax).to(torch.int8).contiguous()  # as the fake says
    return q, (scale + 0.0 * amax).contiguous()  # 0 * NaN = 0 * inf = NaN: the row's scale carries the poison


@torch.library.custom_op(f"{_LIB}::quantize_act", mutates_args=())
def quantize_act(x: torch.Tensor, bits: int, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token (dynamic) or per-tensor (static) quantization to `bits` in an int8 container."""
    if bits not in (4, 8):
        raise ShapeError(f"qvla::quantize_act supports 4 or 8 bits, got {bits}")
    return quantize_act_ref(x, bits, static_scale)


@quantize_act.register_fake
def _(x, bits, static_scale=None):
    shape = (*x.shape[:-1], 1)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# int8_linear
# --------------------------------------------------------------------------------------------------------------
def _check_linear(name: str, xq, x_scale, k_weight: int):
    if xq.dtype != torch.int8:
        raise ShapeError(f"qvla::{name}: activations must be int8 (from qvla::quantize_act), got {xq.dtype}")
    if xq.shape[-1] != k_weight:
        raise ShapeError(f"qvla::{name}: activation has K={xq.shape[-1]} but the weight expects K={k_weight}")
    if x_scale.shape[:-1] != xq.shape[:-1]:
        raise ShapeError(f"qvla::{name}: x_scale shape {tuple(x_scale.shape)} does not match tokens {tuple(xq.shape[:-1])}")


def int8_linear_ref(xq, x_scale, w_q, w_scale, bias=None, out_dtype=torch.float32):
    """Reference in int64/float64: the golden semantics of qvla::int8_linear."""
    acc = (xq.to(torch.int64) @ w_q.to(torch.int64).t()).double()
    out = acc * x_scale.double() * w_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


@torch.library.custom_op(f"{_LIB}::int8_linear", mutates_args=())
def int8_linear(
    xq: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8 activations x int8 weights -> int32 accumulator -> (acc * x_scale * w_scale + bias) in out_dtype."""
    k = xq.shape[-1]
    _check_linear("int8_linear", xq, x_scale, w_q.shape[1])
    lead = xq.shape[:-1]
    out = cpu_gemm.int_matmul_prepared(xq.reshape(-1, k), w_q)  # = int32 accumulator .float(), fresh tensor
    out.mul_(x_scale.reshape(-1, 1)).mul_(w_scale)
    if bias is not None:
        out.add_(bias.float())
    return out.reshape(*lead, w_q.shape[0]).to(out_dtype)


@int8_linear.register_fake
def _(xq, x_scale, w_q, w_scale, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], w_q.shape[0]), dtype=out_dtype)


# --------------------------------------------------------------------------------------------------------------
# int4_linear
# --------------------------------------------------------------------------------------------------------------
def int4_linear_ref(xq, x_scale, w_packed, w_scale, bias=None, group_size=128, out_dtype=torch.float32):
    k = xq.shape[-1]
    w = unpack_int4(w_packed, k).to(torch.int64)
    x = xq.to(torch.int64)
    out = torch.zeros((*xq.shape[:-1], w.shape[0]), dtype=torch.float64)
    for g, start in enumerate(range(0, k, group_size)):
        acc = x[..., start:start + group_size] @ w[:, start:start + group_size].t()
        out += acc.double() * w_scale[:, g].double()
    out = out * x_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


@torch.library.custom_op(f"{_LIB}::int4_linear", mutates_args=())
def int4_linear(
    xq: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8/int4 activations x packed int4 weights, int32 accumulation per K-group, fp32 sum of scaled groups."""
    k = xq.shape[-1]
    # the packed weight holds ceil(K/2) bytes per row, so K and K+1 (odd K) both fit; report the even one
    _check_linear("int4_linear", xq, x_scale, k if (k + 1) // 2 == w_packed.shape[1] else 2 * w_packed.shape[1])
    lead, n = xq.shape[:-1], w_packed.shape[0]
    x = xq.reshape(-1, k).contiguous()
    # the weight is unpacked once per packed weight and cached (cpu_gemm.weight_operand), not at every call
    def unpacked():
        return cpu_gemm.weight_operand(w_packed, ("unpack_int4", k), lambda: unpack_int4(w_packed, k))

    if w_scale.shape[1] == 1:
        out = cpu_gemm.int_matmul_prepared(x, unpacked()) * w_scale[:, 0]
    elif cpu_gemm.backend() == "fp32_exact" and group_size <= cpu_gemm.EXACT_CHUNK and x.shape[0] and n:
        # one batched fp32 GEMM over the K-groups; each group's sum (<= 1024 terms) is an exact integer
        n_groups = -(-k // group_size)
        xa = torch.nn.functional.pad(x, (0, n_groups * group_size - k)).float()
        xa = xa.reshape(x.shape[0], n_groups, group_size).transpose(0, 1)
        wb = cpu_gemm.grouped_operand(w_packed, group_size, k, lambda: unpack_int4(w_packed, k))
        out = (torch.bmm(xa, wb) * w_scale.t()[:, None, :]).sum(0)
    else:  # exact int32 sum per group, then the group's scale: sum_g acc_g * s[:, g]
        out = (grouped_int_matmul(x, unpacked(), group_size).float() * w_scale.t()[:, None, :]).sum(0)
    out = out * x_scale.reshape(-1, 1)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*lead, n).to(out_dtype)


@int4_linear.register_fake
def _(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype):
    return xq.new_empty((*xq.shape[:-1], w_packed.shape[0]), dtype=out_dtype)


QVLA_LINEAR_OPS = (torch.ops.qvla.int8_linear.default, torch.ops.qvla.int4_linear.default)


@dataclasses.dataclass(frozen=True)
class Lowering:
    """What a quantized linear of one weight width becomes: the op, and its arguments after (xq, xs, Wq, Ws, b)."""

    op: Callable
    extra_args: Callable[[QuantSpec], tuple]


# Patterns are data: aten.linear with W{bits} → this op (lowering/lower_linears.py rewrites by this table).
LOWERINGS: dict[int, Lowering] = {
    8: Lowering(torch.ops.qvla.int8_linear.default, lambda spec: ()),
    4: Lowering(torch.ops.qvla.int4_linear.default, lambda spec: (spec.group_size,)),
}
QVLA_QUANT_OPS = (torch.ops.qvla.quantize_act.default,)
