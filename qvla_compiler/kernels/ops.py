"""The `qvla::` integer ops: schema, CPU integer implementation, fake (meta) implementation and pure-torch reference.

A quantized linear is two ops, so one activation quantization can feed every consumer of the same tensor
(q/k/v share one, gate/up share one):

    xq, xs = qvla::quantize_act(x, bits, static_scale)          # per-token (or static per-tensor) symmetric
    y      = qvla::int8_linear(xq, xs, w_q, w_scale, bias, dtype)  # int8 x int8 -> int32, scales in the epilogue
    y      = qvla::int4_linear(xq, xs, w_packed, w_scale, bias, group_size, dtype)
    y      = qvla::bitplane_linear(xq, xs, w_planes, w_scale, bias, bits, group_size, dtype)   # 2- or 3-bit weights

The CPU implementations do exact integer arithmetic (int32 accumulators, K-split with int64 sums past 131,071 terms
so no K overflows; `kernels/cpu_gemm.py` picks `torch._int_mm` or an exact chunked fp32 GEMM, whichever is fast on
this CPU); int4 weights (two per byte) and 2-/3-bit weights (bit-planes: `bits` bytes per 8 weights) are unpacked
to int8 once per weight (cached) and accumulated exactly per group of `group_size` along K.
Non-finite activations propagate as in float: quantize_act gives the token a NaN scale, which the epilogue multiplies
in. The GPU implementations (Triton)
register themselves for the "cuda" dispatch key on top of these schemas, so one saved program runs on both.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch

from qvla_compiler.errors import ShapeError
from qvla_compiler.kernels import cpu_gemm
from qvla_compiler.kernels.cpu_gemm import group_accumulators
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
# 2- and 3-bit packing: bit-planes. Row n's plane p holds bit p of the offset-binary code u = w + 2^(bits-1) of every
# weight, 8 weights per byte (bit i of byte j = weight 8j + i), so a row takes bits·ceil(K/8) bytes, any bits <= 8.
# --------------------------------------------------------------------------------------------------------------
def pack_bitplanes(w: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [N, K] with values in [-2^(bits-1), 2^(bits-1)) -> uint8 [N, bits, ceil(K/8)] (padding codes are 0)."""
    k = w.shape[-1]
    u = (w.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    u = torch.nn.functional.pad(u, (0, -k % 8)).reshape(*w.shape[:-1], 1, -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=w.device)
    planes = (u >> shifts[:bits, None, None]) & 1  # [N, bits, K/8, 8]
    return (planes << shifts).sum(-1, dtype=torch.uint8)  # disjoint bits: the sum is their OR


def unpack_bitplanes(planes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_bitplanes: uint8 [N, bits, ceil(K/8)] -> int8 [N, K]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    bit = ((planes[..., None] >> shifts) & 1).flatten(-2).to(torch.int16)  # [N, bits, 8·ceil(K/8)]
    u = (bit << shifts[:bits, None].to(torch.int16)).sum(-2)
    return (u - 2 ** (bits - 1)).to(torch.int8)[..., :k]


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
# grouped weights: int4_linear (two nibbles per byte) and bitplane_linear (2 or 3 bits), one integer sum per K-group
# --------------------------------------------------------------------------------------------------------------
def grouped_linear_ref(xq, x_scale, w, w_scale, bias=None, group_size=128, out_dtype=torch.float32):
    """Reference in int64/float64 over the unpacked integer weight w [N, K]: Σ_g (x_g · w_gᵀ) s_g, times x_scale."""
    k = xq.shape[-1]
    w, x = w.to(torch.int64), xq.to(torch.int64)
    out = torch.zeros((*xq.shape[:-1], w.shape[0]), dtype=torch.float64, device=xq.device)
    for g, start in enumerate(range(0, k, group_size)):
        acc = x[..., start:start + group_size] @ w[:, start:start + group_size].t()
        out += acc.double() * w_scale[:, g].double()
    out = out * x_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def int4_linear_ref(xq, x_scale, w_packed, w_scale, bias=None, group_size=128, out_dtype=torch.float32):
    return grouped_linear_ref(xq, x_scale, unpack_int4(w_packed, xq.shape[-1]), w_scale, bias, group_size, out_dtype)


def bitplane_linear_ref(xq, x_scale, w_planes, w_scale, bias=None, bits=3, group_size=128, out_dtype=torch.float32):
    w = unpack_bitplanes(w_planes, bits, xq.shape[-1])
    return grouped_linear_ref(xq, x_scale, w, w_scale, bias, group_size, out_dtype)


def _grouped_linear(xq, x_scale, w_stored, unpack: Callable, w_scale, bias, group_size: int, out_dtype):
    """The CPU kernel of both grouped formats. `unpack()` gives the int8 [N, K] weight of `w_stored`; it runs once
    per stored weight (cpu_gemm.weight_operand caches it), not at every call."""
    k = xq.shape[-1]
    lead, n = xq.shape[:-1], w_stored.shape[0]
    x = xq.reshape(-1, k).contiguous()

    def unpacked():
        return cpu_gemm.weight_operand(w_stored, ("unpacked", k), unpack)

    if w_scale.shape[1] == 1:
        out = cpu_gemm.int_matmul_prepared(x, unpacked()) * w_scale[:, 0]
    elif cpu_gemm.backend() == "fp32_exact" and group_size <= cpu_gemm.EXACT_CHUNK and x.shape[0] and n:
        # one batched fp32 GEMM over the K-groups; each group's sum (<= 1024 terms) is an exact integer
        n_groups = -(-k // group_size)
        xa = torch.nn.functional.pad(x, (0, n_groups * group_size - k)).float()
        xa = xa.reshape(x.shape[0], n_groups, group_size).transpose(0, 1)
        wb = cpu_gemm.grouped_operand(w_stored, group_size, k, unpack)
        out = _sum_scaled_groups(torch.bmm(xa, wb), w_scale)
    else:  # exact int32 sum per group, then the group's scale: sum_g acc_g * s[:, g]
        out = _sum_scaled_groups(group_accumulators(x, unpacked(), group_size), w_scale)
    out = out * x_scale.reshape(-1, 1)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*lead, n).to(out_dtype)


def _sum_scaled_groups(accumulators: Iterable[torch.Tensor], w_scale: torch.Tensor) -> torch.Tensor:
    """Σ_g acc_g · w_scale[:, g] over the per-group accumulators (each [M, N]; at least one), summed in place into one
    fp32 [M, N]. Scaling a stacked [G, M, N] and then reducing it took 8x as long at M = 1032 (RESULTS §1e). An fp32
    accumulator (a temporary of the caller's) is scaled in place."""
    scales = w_scale.t().float().contiguous()
    out = None
    for g, acc in enumerate(accumulators):
        term = acc.float().mul_(scales[g])
        out = term if out is None else out.add_(term)
    return out


@torch.library.custom_op(f"{_LIB}::int4_linear", mutates_args=())
def int4_linear(
    xq: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8/int4 activations x packed int4 weights, int32 accumulation per K-group, fp32 sum of scaled groups."""
    k = xq.shape[-1]
    # the packed weight holds ceil(K/2) bytes per row, so K and K+1 (odd K) both fit; report the even one
    _check_linear("int4_linear", xq, x_scale, k if (k + 1) // 2 == w_packed.shape[1] else 2 * w_packed.shape[1])
    return _grouped_linear(xq, x_scale, w_packed, lambda: unpack_int4(w_packed, k), w_scale, bias, group_size,
                           out_dtype)


@int4_linear.register_fake
def _(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype):
    return xq.new_empty((*xq.shape[:-1], w_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op(f"{_LIB}::bitplane_linear", mutates_args=())
def bitplane_linear(
    xq: torch.Tensor, x_scale: torch.Tensor, w_planes: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, bits: int, group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8/int4 activations x 2- or 3-bit weights in bit-planes (uint8 [N, bits, ceil(K/8)]), as int4_linear."""
    k = xq.shape[-1]
    if bits not in (2, 3) or w_planes.dim() != 3 or w_planes.shape[1] != bits or w_planes.dtype != torch.uint8:
        raise ShapeError(f"qvla::bitplane_linear: takes 2- or 3-bit weights as uint8 [N, bits, ceil(K/8)]; got "
                         f"bits={bits} and {w_planes.dtype} {tuple(w_planes.shape)}")
    _check_linear("bitplane_linear", xq, x_scale, k if -(-k // 8) == w_planes.shape[2] else 8 * w_planes.shape[2])
    return _grouped_linear(xq, x_scale, w_planes, lambda: unpack_bitplanes(w_planes, bits, k), w_scale, bias,
                           group_size, out_dtype)


@bitplane_linear.register_fake
def _(xq, x_scale, w_planes, w_scale, bias, bits, group_size, out_dtype):
    return xq.new_empty((*xq.shape[:-1], w_planes.shape[0]), dtype=out_dtype)


QVLA_LINEAR_OPS = (torch.ops.qvla.int8_linear.default, torch.ops.qvla.int4_linear.default,
                   torch.ops.qvla.bitplane_linear.default)
QVLA_LINEAR_NAMES = tuple(str(op) for op in QVLA_LINEAR_OPS)  # "qvla.int8_linear.default", ...: how FX prints them


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One weight width's integer format: the op a quantized linear becomes, its arguments after (xq, xs, Wq, Ws,
    b), and how the integers [N, K] are packed into the stored weight and back."""

    op: Callable
    extra_args: Callable[[QuantSpec], tuple]
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]  # (stored weight, K) -> int8 [N, K]


def _bitplanes(bits: int) -> Lowering:
    return Lowering(torch.ops.qvla.bitplane_linear.default, lambda spec: (bits, spec.group_size),
                    lambda q: pack_bitplanes(q, bits), lambda p, k: unpack_bitplanes(p, bits, k))


# Patterns are data: aten.linear with W{bits} → this op (lowering/lower_linears.py rewrites by this table).
LOWERINGS: dict[int, Lowering] = {
    8: Lowering(torch.ops.qvla.int8_linear.default, lambda spec: (), lambda q: q, lambda q, k: q),
    4: Lowering(torch.ops.qvla.int4_linear.default, lambda spec: (spec.group_size,), pack_int4, unpack_int4),
    3: _bitplanes(3),
    2: _bitplanes(2),
}
WEIGHT_BITS = tuple(sorted(LOWERINGS))  # (2, 3, 4, 8): the integer weight widths
QVLA_QUANT_OPS = (torch.ops.qvla.quantize_act.default,)
