"""Exact integer GEMMs on the CPU: int8 x int8 -> int32, two interchangeable backends.

* "int_mm": `torch._int_mm`. Fast where oneDNN has int8 kernels for the CPU (AVX512-VNNI, AMX); on AVX2-only CPUs it
  falls to a generic loop that is ~30x slower than an fp32 GEMM (measured: 49x384 @ 384x1536, 23 ms vs 0.7 ms).
* "fp32_exact": the same integer dot products on the fp32 FMA units, K split into chunks of at most 1024. Every
  operand is an integer with |v| <= 128, so every partial sum of a chunk is an integer of magnitude <= 1024 * 128^2
  = 2^24, which fp32 represents exactly; chunk results are converted to int32 and summed in int32. The result is
  bit-identical to `torch._int_mm` (tests assert it), at fp32-GEMM speed.

The backend is chosen once from the CPU's capability; QVLA_CPU_GEMM=int_mm|fp32_exact overrides it.
"""
from __future__ import annotations

import functools
import os

import torch

EXACT_CHUNK = 1024  # 1024 * 128 * 128 = 2**24: the largest K whose partial sums fp32 holds exactly
_BACKENDS = ("int_mm", "fp32_exact")


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


def int_matmul(a: torch.Tensor, b_t: torch.Tensor, which: str | None = None) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> int32 [M, N], exact."""
    if a.shape[0] == 0:
        return a.new_zeros((0, b_t.shape[0]), dtype=torch.int32)
    if (which or backend()) == "int_mm":
        # _int_mm wants a row-major A and a column-major B; the weight is stored [N, K] so .t() is free.
        return torch._int_mm(a.contiguous(), b_t.t())
    k = a.shape[1]
    acc = None
    for start in range(0, k, EXACT_CHUNK):
        part = a[:, start:start + EXACT_CHUNK].float() @ b_t[:, start:start + EXACT_CHUNK].float().t()
        part = part.to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def grouped_int_matmul(a: torch.Tensor, b_t: torch.Tensor, group: int, which: str | None = None) -> torch.Tensor:
    """Per-group exact accumulators: int8 [M, K], int8 [N, K] -> int32 [G, M, N] for groups of `group` along K."""
    k = a.shape[1]
    n_groups = -(-k // group)
    if (which or backend()) == "int_mm" or group > EXACT_CHUNK:
        return torch.stack([int_matmul(a[:, g * group:(g + 1) * group], b_t[:, g * group:(g + 1) * group], which)
                            for g in range(n_groups)])
    pad = n_groups * group - k  # zero columns add nothing to any group's sum
    xa = torch.nn.functional.pad(a, (0, pad)).float().reshape(a.shape[0], n_groups, group).transpose(0, 1)
    wb = torch.nn.functional.pad(b_t, (0, pad)).float().reshape(b_t.shape[0], n_groups, group).permute(1, 2, 0)
    return torch.bmm(xa, wb).to(torch.int32)
