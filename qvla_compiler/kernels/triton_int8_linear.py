"""W8A8 GEMM: int8 activations x int8 weights -> exact int32 accumulator -> scaled epilogue, in Triton.

Semantics of `qvla::int8_linear(xq, x_scale, w_q, w_scale, bias, out_dtype)`:
    acc = sum_k xq[m, k] * w_q[n, k]                       int32, exact (tl.dot int8 x int8 -> int32)
    out = (acc.float() * x_scale[m] * w_scale[n] + bias[n]).to(out_dtype)
The main loop is a pure int8 MMA; every scale sits in the epilogue. Two launch shapes share one kernel:
  * tiled (SPLIT_K = 1): direct store in out_dtype; BLOCK_M >= 64 with 4/8 warps for M > 64 so sm_90 emits wgmma.
  * split-K (M <= 16, long K): programs own a K-slice, scale their partial and atomically add into a zeroed fp32
    buffer (fp32 sum order varies run to run; the int32 partials are exact).
RAW_ACC=True stores the unscaled int32 accumulator (exact, atomics in int32 for split-K): the debug path tests use.
Exact for any K: an int32 sum of K int8 products can pass 2^31 from K = 131,072 (|v| = 128). Past `max_exact_k()`
the launcher splits K into slices no longer than that, takes each slice's exact int32 accumulator, sums them in
int64 and applies the epilogue in float64 (`_launch_k_split`); below it, one launch as before.
"""

import triton
import triton.language as tl
import torch
from triton import knobs

from qvla_compiler.errors import ShapeError
from qvla_compiler.kernels.cpu_gemm import k_chunks, max_exact_k

_INTERPRET = bool(knobs.runtime.interpret)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SPLIT_K_MAX_M = 16     # skinny GEMMs: too few output tiles to fill the SMs, so split K instead
_SPLIT_K_MIN_K = 1024


@triton.jit
def _int8_linear_kernel(
    # pointers
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides (x: [M, K], w: [N, K], out: [M, N]; x_scale per row may be broadcast with stride 0)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xs, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    RAW_ACC: tl.constexpr,       # store the int32 accumulator, no scales, no bias
    SPLIT_K: tl.constexpr,       # > 1: atomic-add partial results (out must be zeroed fp32 / int32)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,       # grouped tile order for L2 reuse of w
):
    # -- block 1: program id -> (tile_m, tile_n, k-slice), grouped ordering ---------------------------------
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    k_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = tl.cdiv(k_blocks, SPLIT_K)
    kb_start = pid_k * blocks_per_split
    kb_end = min(kb_start + blocks_per_split, k_blocks)

    # -- block 2: pointers (w is read as its transpose [K, N] straight from the [N, K] layout) ---------------
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    x_base = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_base = w_ptr + rn[None, :].to(tl.int64) * stride_wn

    # -- block 3: masked int8 MMA over this program's K blocks --------------------------------------------
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(kb_start, kb_end):
        k = kb * BLOCK_K + rk
        mask_k = k < K
        a = tl.load(x_base + k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(w_base + k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    # -- block 4: epilogue (per-token x per-channel scale, bias) and store / atomic add -------------------
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    mask_out = mask_m[:, None] & mask_n[None, :]
    if RAW_ACC:
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc, mask=mask_out)
        else:
            tl.atomic_add(out_ptrs, acc, mask=mask_out)
    else:
        xs = tl.load(xs_ptr + rm * stride_xs, mask=mask_m, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=mask_n, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
            out += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_out)
        else:
            tl.atomic_add(out_ptrs, out, mask=mask_out)


def _cfg(bm, bn, bk, warps, stages, split_k=1, group_m=8):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "SPLIT_K": split_k}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def get_autotune_configs(split_k: bool = False) -> list:
    """Autotune table keyed on M/N/K. split_k=True: the atomic skinny path; otherwise the tiled path."""
    if _INTERPRET:  # the interpreter supports one config only; big tiles keep it fast
        return [_cfg(32, 64, 128, 4, 1, split_k=2 if split_k else 1)]
    if split_k:
        return [
            _cfg(16, 64, 256, 4, 4, split_k=2),
            _cfg(16, 64, 256, 4, 4, split_k=4),
            _cfg(16, 128, 128, 4, 4, split_k=4),
            _cfg(16, 64, 128, 2, 5, split_k=8),
            _cfg(16, 128, 256, 4, 3, split_k=8),
            _cfg(16, 32, 256, 2, 4, split_k=16),
        ]
    return [
        # small M (<= 64): mma.sync tiles, wide N to cover the weight quickly
        _cfg(16, 64, 128, 4, 4),
        _cfg(16, 128, 128, 4, 4),
        _cfg(32, 64, 128, 4, 4),
        _cfg(32, 128, 128, 4, 4),
        _cfg(32, 64, 256, 4, 3),
        # M >= 64: 64-row multiples with num_warps % 4 == 0 -> wgmma (IGMMA) on sm_90
        _cfg(64, 64, 128, 4, 4),
        _cfg(64, 128, 128, 4, 4),
        _cfg(64, 256, 128, 8, 3),
        _cfg(128, 128, 128, 8, 3),
        _cfg(128, 256, 128, 8, 3),
        _cfg(128, 128, 64, 4, 4),
    ]


def _prune_configs(configs, named_args, **kwargs):
    if _INTERPRET:
        return configs[:1]
    m, k = named_args["M"], named_args["K"]
    big = 64 if m > 64 else 0
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] >= big and c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m)))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(k))]
    return kept or configs[:1]


_int8_linear_tiled = triton.autotune(
    configs=get_autotune_configs(split_k=False), key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_int8_linear_kernel)
_int8_linear_split_k = triton.autotune(
    configs=get_autotune_configs(split_k=True), key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs}, reset_to_zero=["out_ptr"],
)(_int8_linear_kernel)


def _check_inputs(xq, x_scale, w_q, w_scale, bias, out_dtype):
    if xq.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise ShapeError(f"int8_linear: xq and w_q must be int8, got {xq.dtype} and {w_q.dtype}")
    if w_q.dim() != 2 or xq.dim() < 1 or xq.shape[-1] != w_q.shape[1]:
        raise ShapeError(f"int8_linear: need xq [..., K] and w_q [N, K] with equal K, "
                         f"got xq {tuple(xq.shape)} and w_q {tuple(w_q.shape)}")
    n, lead = w_q.shape[0], xq.shape[:-1]
    if w_scale.numel() != n:
        raise ShapeError(f"int8_linear: w_scale must hold one scale per output channel ({n}), "
                         f"got shape {tuple(w_scale.shape)}")
    if x_scale.numel() not in (1, xq[..., :1].numel()):
        raise ShapeError(f"int8_linear: x_scale must be [..., 1] matching xq {tuple(xq.shape)} (one scale per token), "
                         f"got {tuple(x_scale.shape)}")
    if bias is not None and bias.numel() != n:
        raise ShapeError(f"int8_linear: bias must have N={n} elements, got shape {tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ShapeError(f"int8_linear: out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    devices = {t.device for t in (xq, x_scale, w_q, w_scale, bias) if t is not None}
    if len(devices) != 1:
        raise ShapeError(f"int8_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    return lead, n


def _launch_k_split(xq, x_scale, w_q, w_scale, bias, out_dtype, raw_acc, config, max_k):
    """K > max_k: exact int32 accumulators of K-slices (each <= max_k long), summed in int64; float64 epilogue."""
    lead, n = _check_inputs(xq, x_scale, w_q, w_scale, bias, out_dtype)
    x2 = xq.reshape(-1, xq.shape[-1])
    acc = torch.zeros((x2.shape[0], n), dtype=torch.int64, device=xq.device)
    for start, stop in k_chunks(xq.shape[-1], max_k):
        acc += int8_linear_acc(x2[:, start:stop], w_q[:, start:stop], config=config).to(torch.int64)
    if raw_acc:
        return acc.reshape(*lead, n)
    out = acc.double() * x_scale.double().reshape(-1, 1) * w_scale.double().reshape(-1)
    if bias is not None:
        out = out + bias.double().reshape(-1)
    return out.to(out_dtype).reshape(*lead, n)


def _launch(xq, x_scale, w_q, w_scale, bias, out_dtype, raw_acc=False, config=None, max_k=None):
    """(1) check shapes, (2) allocate, (3) launch. config: a dict of meta-parameters bypassing autotune.
    max_k: longest K one int32 accumulator may sum (default max_exact_k(); tests lower it to exercise the split)."""
    max_k = max_k or max_exact_k()
    if xq.shape[-1] > max_k:
        return _launch_k_split(xq, x_scale, w_q, w_scale, bias, out_dtype, raw_acc, config, max_k)
    lead, n = _check_inputs(xq, x_scale, w_q, w_scale, bias, out_dtype)
    k = xq.shape[-1]
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    xs = x_scale.to(torch.float32).reshape(-1)
    stride_xs = 0 if xs.numel() == 1 else xs.stride(0)
    ws = w_scale.to(torch.float32).reshape(-1).contiguous()
    split = config["SPLIT_K"] > 1 if config else (m <= _SPLIT_K_MAX_M and k >= _SPLIT_K_MIN_K)
    acc_dtype = torch.int32 if raw_acc else (torch.float32 if split else out_dtype)
    out = (torch.zeros if split else torch.empty)((m, n), dtype=acc_dtype, device=xq.device)
    if m > 0 and n > 0:
        args = (x2, xs, w_q, ws, bias if bias is not None else ws, out, m, n, k,
                x2.stride(0), x2.stride(1), w_q.stride(0), w_q.stride(1), stride_xs, out.stride(0), out.stride(1))
        flags = {"HAS_BIAS": bias is not None, "RAW_ACC": raw_acc}
        if config is not None:
            grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
            _int8_linear_kernel[grid](*args, **flags, **config)
        else:
            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
            (_int8_linear_split_k if split else _int8_linear_tiled)[grid](*args, **flags)
    if not raw_acc and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out.reshape(*lead, n)


def int8_linear(xq, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16, *, max_k=None):
    """Triton launcher with the `qvla::int8_linear` contract; returns [..., N] in out_dtype."""
    return _launch(xq, x_scale, w_q, w_scale, bias, out_dtype, max_k=max_k)


def int8_linear_acc(xq, w_q, config=None, *, max_k=None):
    """Debug path: the raw accumulator xq @ w_q.T (no scales, no bias), shape [..., N]; int32, or int64 when K was
    split (K > max_k)."""
    ones_x = torch.ones((1,), dtype=torch.float32, device=xq.device)
    ones_w = torch.ones((w_q.shape[0],), dtype=torch.float32, device=xq.device)
    return _launch(xq, ones_x, w_q, ones_w, None, torch.float32, raw_acc=True, config=config, max_k=max_k)


def int8_linear_ref(xq, x_scale, w_q, w_scale, bias=None, out_dtype=torch.bfloat16):
    """Pure-torch reference: int64 accumulation, float64 epilogue, one rounding to out_dtype at the end."""
    acc = xq.to(torch.int64) @ w_q.to(torch.int64).T
    out = acc.double() * x_scale.double() * w_scale.double().reshape(-1)
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)
