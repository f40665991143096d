"""Exact integer GEMMs on the CPU: int8 x int8 -> integer accumulator, two interchangeable backends, any K.

* "int_mm": `torch._int_mm`. Fast where oneDNN has int8 kernels for the CPU (AVX512-VNNI, AMX); on AVX2-only CPUs it
  falls to a generic strided loop that is ~30x slower than an fp32 GEMM (measured: 49x384 @ 384x1536, 23 ms vs
  0.7 ms). The oneDNN path (`_mkldnn_gemm_i8i8i32_with_blas`) reads each operand as row-major ('N') when its last
  stride is 1 and takes the leading dimension from the other stride, without checking it; a leading dimension below
  the row length makes oneDNN reject the call silently and return the uninitialised output. A size-1 dimension's
  stride is arbitrary, so `w.t()` of a [N, 1] weight has strides (1, 1) -> 'N' with ldb = 1 < N -> garbage, and a
  [1, K] activation with stride(0) = 0 does the same. `_blas_operands` hands it only layouts whose leading dimension
  is valid (copying the rare operand that is not), so it never reaches that path; `blas_layout_ok` is the rule.
* "fp32_exact": the same integer dot products on the fp32 FMA units, K split into chunks of at most 1024. Every
  operand is an integer with |v| <= 128, so every partial sum of a chunk is an integer of magnitude <= 1024 * 128^2
  = 2^24, which fp32 represents exactly. The result is bit-identical to `torch._int_mm` (tests assert it).

Exact for any K: a dot product of K int8 terms is bounded by K * 128^2, which passes int32 at K = 131,072 (at +-127:
K = 133,144). Both backends therefore accumulate in int32 only up to `max_exact_k()` terms and sum those partial
results in int64: the output is int32 when K <= max_exact_k() (the common case, unchanged) and int64 above it.

The backend is chosen once from the CPU's capability; QVLA_CPU_GEMM=int_mm|fp32_exact overrides it.

Prepared weights are cached: the fp32 operand of a weight (int8, or int4 unpacked and laid out per K-group) is made
at its first call and reused while the weight tensor lives and is unchanged (`weight_operand`), so no call converts
or unpacks a whole weight. QVLA_CPU_WEIGHT_CACHE=0 turns the cache off (only the integer weights stay resident);
`uncached_weights()` turns it off for a block (the compiler's own one-off runs, which would otherwise hold an fp32
copy of every integer weight: 3.6 GB of groot-full's 17.9 GB compile peak, RESULTS §14).

Why no int8 GEMM instruction on AVX2 (measured in RESULTS §1): AVX2's int8 multiply (vpmaddubsw, u8 x s8) adds pairs
of products into a saturating int16, so full-range int8 operands are inexact (255 * 128 * 2 > 32767; fbgemm and
oneDNN u8s8 both gave wrong sums here). Splitting the activation into two 7-bit halves (a = max(a, 0) - max(-a, 0))
makes both fbgemm and oneDNN exact, but doubles the GEMM, and one u8s8 GEMM is at best ~0.7-1.0x an fp32 GEMM on
this CPU: the split costs 1.4-2x fp32. The fp32 units with exact integer chunks are the fastest exact choice here.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import weakref
from typing import Callable

import torch

EXACT_CHUNK = 1024  # 1024 * 128 * 128 = 2**24: the largest K whose partial sums fp32 holds exactly
INT32_MAX = 2**31 - 1
INT8_MAG = 128  # the largest |v| of any int8 value (-128)
INT4_MAG = 8  # the largest |v| of a signed 4-bit value (-8)
_BACKENDS = ("int_mm", "fp32_exact")


def max_exact_k(a_mag: int = INT8_MAG, b_mag: int = INT8_MAG) -> int:
    """Largest K whose int32 dot product cannot overflow for |a| <= a_mag, |b| <= b_mag: K * a_mag * b_mag < 2^31."""
    return INT32_MAX // (a_mag * b_mag)


def k_chunks(k: int, chunk: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..k, each at most `chunk` long; every start is a multiple of `align`."""
    step = max(chunk // align, 1) * align
    return [(s, min(s + step, k)) for s in range(0, k, step)]


@functools.lru_cache(maxsize=1)
def backend() -> str:
    forced = os.environ.get("QVLA_CPU_GEMM")
    if forced:
        if forced not in _BACKENDS:
            from qvla_compiler.errors import ShapeError

            raise ShapeError(f"QVLA_CPU_GEMM={forced!r}: choose one of {_BACKENDS}")
        return forced
    capability = torch.backends.cpu.get_cpu_capability()
    return "int_mm" if capability.startswith(("AVX512", "AMX")) else "fp32_exact"


def blas_layout_ok(t: torch.Tensor) -> bool:
    """Would oneDNN's row-major int8 GEMM read this 2-D operand [rows, cols] correctly? ('N' needs ld >= cols,
    'T' (column-major) needs a unit row stride and ld >= rows.) Mirrors ATen's choice from the strides."""
    rows, cols = t.shape
    if t.stride(1) == 1:
        return t.stride(0) >= max(cols, 1)
    return t.stride(0) == 1 and t.stride(1) >= max(rows, 1)


def _blas_operands(a: torch.Tensor, b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [M, K] and B = b_t.T [K, N] in layouts `blas_layout_ok` accepts; copies only an operand that fails it."""
    b = b_t.t()
    if not blas_layout_ok(a):
        a = torch.empty(a.shape, dtype=a.dtype).copy_(a)  # fresh row-major: strides (K, 1)
    if not blas_layout_ok(b):
        b = torch.empty(b.shape, dtype=b.dtype).copy_(b)  # fresh row-major: strides (N, 1)
    return a, b


def _int_mm_exact(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    k = a.shape[1]
    if k <= max_exact_k():
        return torch._int_mm(*_blas_operands(a, b_t))
    acc = torch.zeros((a.shape[0], b_t.shape[0]), dtype=torch.int64)
    for start, stop in k_chunks(k, max_exact_k()):  # every chunk's int32 sum is exact; chunks add up in int64
        acc += torch._int_mm(*_blas_operands(a[:, start:stop], b_t[:, start:stop]))
    return acc


def _fp32_exact(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    k = a.shape[1]
    acc_dtype = torch.int32 if k <= max_exact_k() else torch.int64  # |partial sums| <= K * 128^2 either way
    acc = torch.zeros((a.shape[0], b_t.shape[0]), dtype=acc_dtype)
    for start, stop in k_chunks(k, EXACT_CHUNK):
        acc += (a[:, start:stop].float() @ b_t[:, start:stop].float().t()).to(acc_dtype)
    return acc


def int_matmul(a: torch.Tensor, b_t: torch.Tensor, which: str | None = None) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> [M, N], exact for any shape and any K: int32 when K <= max_exact_k(),
    otherwise int64 (the int32 result could have overflowed)."""
    m, k, n = a.shape[0], a.shape[1], b_t.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32 if k <= max_exact_k() else torch.int64)
    if (which or backend()) == "int_mm":
        return _int_mm_exact(a, b_t)
    return _fp32_exact(a, b_t)


def int_matmul_ref(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference: the int64 product a @ b_t.T."""
    return a.to(torch.int64) @ b_t.to(torch.int64).t()


def group_accumulators(a: torch.Tensor, b_t: torch.Tensor, group: int, which: str | None = None):
    """Each K-group's exact accumulator [M, N] in turn (int_matmul of the group's columns), so that a caller summing
    scaled groups never holds all G of them (stacking them cost more than the G GEMMs at M = 1032)."""
    for start in range(0, a.shape[1], group):
        yield int_matmul(a[:, start:start + group], b_t[:, start:start + group], which)


_WEIGHT_CACHE: dict[int, tuple[weakref.ref, dict]] = {}  # id(weight) -> (weak ref to it, {key: (version, op)})


def _forget(wid: int, ref: weakref.ref, cache: dict = _WEIGHT_CACHE) -> None:
    # The cache is bound as a default: weakref callbacks can run at interpreter exit, after module globals are None.
    if cache.get(wid, (None,))[0] is ref:
        del cache[wid]


_UNCACHED = contextvars.ContextVar("qvla_uncached_weights", default=False)


def weight_cache_enabled() -> bool:
    return os.environ.get("QVLA_CPU_WEIGHT_CACHE", "1") != "0" and not _UNCACHED.get()


@contextlib.contextmanager
def uncached_weights():
    """Inside: no prepared operand is cached (each call makes its own and drops it); entries cached before stay."""
    token = _UNCACHED.set(True)
    try:
        yield
    finally:
        _UNCACHED.reset(token)


def weight_operand(w: torch.Tensor, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()` (a prepared operand of weight `w`: its fp32 copy, its unpacked int4, ...) cached per (w, key).

    An entry lives as long as `w` and is rebuilt when `w` is modified in place (its version counter moves).
    Uncached when the cache is off, for tensors without a version counter (inference mode) and while tracing."""
    if not weight_cache_enabled() or w.requires_grad or type(w) is not torch.Tensor or w.device.type != "cpu":
        return make()
    try:
        version = w._version
    except RuntimeError:  # inference tensors have no version counter
        return make()
    slot = _WEIGHT_CACHE.get(id(w))
    if slot is None or slot[0]() is not w:
        slot = _WEIGHT_CACHE[id(w)] = (weakref.ref(w, functools.partial(_forget, id(w))), {})
    entries = slot[1]
    hit = entries.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    value = make()
    entries[key] = (version, value)
    return value


def int_matmul_prepared(a: torch.Tensor, b_t: torch.Tensor, which: str | None = None) -> torch.Tensor:
    """int_matmul with the weight's fp32 operand cached (fp32_exact), as fp32 holding the exact accumulator value
    (what `int_matmul(a, b_t).float()` is, bit for bit)."""
    m, k, n = a.shape[0], a.shape[1], b_t.shape[0]
    if (which or backend()) == "int_mm" or m == 0 or n == 0 or k == 0:
        return int_matmul(a, b_t, which).float()
    wf = weight_operand(b_t, ("fp32_t",), lambda: b_t.float().t())
    af = a.float()
    if k <= EXACT_CHUNK:
        return af @ wf  # one chunk: every partial sum is an integer <= 2^24, exact in fp32
    acc = None  # chunks of <= 1024 terms, each exact; summed as integers (int64 past max_exact_k)
    for start, stop in k_chunks(k, EXACT_CHUNK):
        part = (af[:, start:stop] @ wf[start:stop]).to(torch.int32 if k <= max_exact_k() else torch.int64)
        acc = part if acc is None else acc.add_(part)
    return acc.float()


def grouped_operand(b_t: torch.Tensor, group: int, k: int, make_int8: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The fp32 [G, group, N] layout of an int weight [N, K] (zero-padded to whole groups), cached on `b_t`."""
    def make():
        w = make_int8()
        n_groups = -(-k // group)
        wp = torch.nn.functional.pad(w, (0, n_groups * group - k)).float()
        return wp.reshape(w.shape[0], n_groups, group).permute(1, 2, 0).contiguous()
    return weight_operand(b_t, ("grouped_fp32", group, k), make)
