"""W4A8 / W4A4 GEMM: packed signed int4 weights (per-group scales) x int8-container activations on the int8 MMA.

Semantics of `qvla::int4_linear(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype)`:
    w_packed [N, ceil(K/2)] int8: low nibble = even k, high nibble = odd k (two's complement; odd K: last high = 0)
    acc_g = sum_{k in group g} xq[m, k] * w[n, k]          int32, exact per group
    out   = (sum_g acc_g.float() * w_scale[n, g]) * x_scale[m] + bias[n]  -> out_dtype
Unpacking happens in registers: a [BLOCK_K/2, BLOCK_N] tile of packed bytes is loaded contiguously along K and split
into nibbles with int8 shifts ((p << 4) >> 4 sign-extends the low one), then interleaved back with join/permute/reshape.
An odd group_size (blocks may start mid-byte) falls back to a per-k byte re-read; the compile-only test checks that the
even path keeps vectorized, pipelined weight loads. Hopper has no int4 MMA, so W4A4 is the same kernel with
4-bit activation values; X_PACKED=True reads activations packed two per byte (half the activation bytes).
Loop structure: int32 accumulator within a group, fp32 accumulator across groups (group scale applied per group).
A per-channel weight (one group) is split into 512-wide chunks with a zero scale stride, so split-K still applies.
Exact for any K: a group's int32 accumulator holds at most group_size * 128 * 8 (int8-container activations x int4
weights), so groups up to `max_exact_k(128, 8)` = 2,097,151 are exact and longer ones are refused
(AccumulatorOverflowError, check_accumulator_bounds says so at compile time); the raw debug accumulator, an int32 sum
over all of K, is split in the launcher past that K and summed in int64.
"""

import triton
import triton.language as tl
import torch
from triton import knobs

from qvla_compiler.errors import AccumulatorOverflowError, ShapeError
from qvla_compiler.kernels.cpu_gemm import INT4_MAG, INT8_MAG, k_chunks, max_exact_k
from qvla_compiler.kernels import ops
from qvla_compiler.kernels.ops import pack_int4, unpack_bitplanes

_INTERPRET = bool(knobs.runtime.interpret)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SPLIT_K_MAX_M = 16
_SPLIT_K_MIN_K = 1024
_PER_CHANNEL_CHUNK = 512  # K-chunk used as the "group" when w_scale has a single group


@triton.jit
def _int4_linear_kernel(
    # pointers
    x_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr,
    # sizes (K = logical, unpacked reduction length)
    M, N, K, K_packed, group_size, num_groups,
    # strides (w and packed x are in bytes of the packed layout; ws: [N, G], possibly stride_wsg = 0)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_wsn, stride_wsg, stride_xs, stride_om, stride_on,
    # meta-parameters
    X_PACKED: tl.constexpr,      # activations are int4 packed like the weights (W4A4, half the bytes)
    EVEN_GROUPS: tl.constexpr,   # group_size is even: every block starts on a byte boundary (fast unpack)
    HAS_BIAS: tl.constexpr,
    RAW_ACC: tl.constexpr,       # store sum_g acc_g as int32 (no scales, no bias): exact debug path
    SPLIT_K: tl.constexpr,       # > 1: programs own a range of groups and atomic-add into a zeroed buffer
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # -- block 1: program id -> (tile_m, tile_n, group range), grouped ordering ----------------------------
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    groups_per_split = tl.cdiv(num_groups, SPLIT_K)
    g_start = pid_k * groups_per_split
    g_end = min(g_start + groups_per_split, num_groups)
    blocks_per_group = tl.cdiv(group_size, BLOCK_K)
    half_group = group_size // 2

    # -- block 2: pointers -----------------------------------------------------------------------------------
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rkp = tl.arange(0, BLOCK_K // 2)
    mask_m = rm < M
    mask_n = rn < N
    x_base = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_base = w_ptr + rn[None, :].to(tl.int64) * stride_wn

    # -- block 3: groups (fp32 across) of K blocks (int32 within) ---------------------------------------------
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_raw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for g in range(g_start, g_end):
        g_lo = g * group_size
        g_hi = min(g_lo + group_size, K)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for j in range(0, blocks_per_group):
            k0 = g_lo + j * BLOCK_K
            if EVEN_GROUPS:
                # k0 is even: load packed rows k0/2 .. +BLOCK_K/2 as contiguous bytes (vectorized, pipelined) and
                # split the nibbles in registers: (p << 4) >> 4 sign-extends the low one, p >> 4 gives the high one
                kp = g * half_group + j * (BLOCK_K // 2) + rkp  # == k0 // 2 + rkp, in a form the
                mask_kp = kp < min(g * half_group + half_group, K_packed)  # alignment analysis can vectorize
                pw = tl.load(w_base + kp[:, None] * stride_wk, mask=mask_kp[:, None] & mask_n[None, :], other=0)
                b = tl.reshape(tl.permute(tl.join((pw << 4) >> 4, pw >> 4), (0, 2, 1)), (BLOCK_K, BLOCK_N))
                if X_PACKED:
                    px = tl.load(x_base + kp[None, :] * stride_xk, mask=mask_m[:, None] & mask_kp[None, :], other=0)
                    a = tl.reshape(tl.join((px << 4) >> 4, px >> 4), (BLOCK_M, BLOCK_K))
                else:
                    k = k0 + rk
                    a = tl.load(x_base + k[None, :] * stride_xk, mask=mask_m[:, None] & (k < g_hi)[None, :], other=0)
            else:
                # odd group_size: a block may start on a high nibble, so every k re-reads its byte and shifts its
                # nibble to the top (shift amounts cast to int8: an int32 shift would promote and lose the sign)
                k = k0 + rk
                mask_k = k < g_hi
                up = ((1 - (k % 2)) * 4).to(tl.int8)
                pw = tl.load(w_base + (k[:, None] // 2) * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0)
                b = ((pw << up[:, None]).to(tl.int8) >> 4).to(tl.int8)
                if X_PACKED:
                    px = tl.load(x_base + (k[None, :] // 2) * stride_xk, mask=mask_m[:, None] & mask_k[None, :],
                                 other=0)
                    a = ((px << up[None, :]).to(tl.int8) >> 4).to(tl.int8)
                else:
                    a = tl.load(x_base + k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0)
            acc_g = tl.dot(a, b, acc_g, out_dtype=tl.int32)
        if RAW_ACC:
            acc_raw += acc_g
        else:
            ws_g = tl.load(ws_ptr + rn.to(tl.int64) * stride_wsn + g * stride_wsg, mask=mask_n, other=0.0)
            acc_f += acc_g.to(tl.float32) * ws_g[None, :]

    # -- block 4: epilogue (per-token scale, bias) and store / atomic add ---------------------------------------
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    mask_out = mask_m[:, None] & mask_n[None, :]
    if RAW_ACC:
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc_raw, mask=mask_out)
        else:
            tl.atomic_add(out_ptrs, acc_raw, mask=mask_out)
    else:
        xs = tl.load(xs_ptr + rm * stride_xs, mask=mask_m, other=0.0)
        out = acc_f * xs[:, None]
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
    """Autotune table keyed on M/N/K (+ group size). BLOCK_K candidates are pruned to divisors of group_size."""
    if _INTERPRET:
        return [_cfg(32, 64, 64, 4, 1, split_k=2 if split_k else 1)]
    if split_k:
        return [
            _cfg(16, 64, 64, 4, 4, split_k=4),
            _cfg(16, 64, 128, 4, 4, split_k=4),
            _cfg(16, 128, 128, 4, 4, split_k=8),
            _cfg(16, 64, 64, 2, 5, split_k=8),
            _cfg(16, 64, 128, 4, 3, split_k=16),
        ]
    return [
        # small M (<= 64): mma.sync tiles
        _cfg(16, 64, 32, 4, 4),  # group_size 32
        _cfg(16, 64, 64, 4, 4),
        _cfg(16, 128, 128, 4, 4),
        _cfg(32, 64, 128, 4, 4),
        _cfg(32, 128, 64, 4, 4),
        # M >= 64: 64-row multiples, num_warps % 4 == 0 -> wgmma on sm_90
        _cfg(64, 64, 32, 4, 4),  # group_size 32
        _cfg(64, 64, 64, 4, 4),
        _cfg(64, 128, 128, 4, 4),
        _cfg(64, 256, 64, 8, 3),
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 128, 8, 3),
    ]


def _prune_configs(configs, named_args, **kwargs):
    if _INTERPRET:
        return configs[:1]
    m, gs = named_args["M"], named_args["group_size"]
    big = 64 if m > 64 else 0
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] >= big and c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
            and gs % c.kwargs["BLOCK_K"] == 0]
    return kept or [c for c in configs if gs % c.kwargs["BLOCK_K"] == 0][:1] or configs[:1]


_KEY = ["M", "N", "K", "group_size", "X_PACKED"]  # EVEN_GROUPS follows group_size
_int4_linear_tiled = triton.autotune(
    configs=get_autotune_configs(split_k=False), key=_KEY,
    prune_configs_by={"early_config_prune": _prune_configs},
)(_int4_linear_kernel)
_int4_linear_split_k = triton.autotune(
    configs=get_autotune_configs(split_k=True), key=_KEY,
    prune_configs_by={"early_config_prune": _prune_configs}, reset_to_zero=["out_ptr"],
)(_int4_linear_kernel)


def _check_inputs(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype, k):
    if xq.dtype != torch.int8 or w_packed.dtype != torch.int8:
        raise ShapeError(f"int4_linear: xq and w_packed must be int8 containers, got {xq.dtype} and {w_packed.dtype}")
    if w_packed.dim() != 2 or w_packed.shape[1] != (k + 1) // 2:
        raise ShapeError(f"int4_linear: w_packed must be [N, ceil(K/2)] = [N, {(k + 1) // 2}] for K={k}, "
                         f"got {tuple(w_packed.shape)}")
    if group_size <= 0:
        raise ShapeError(f"int4_linear: group_size must be positive, got {group_size}")
    n, groups = w_packed.shape[0], -(-k // group_size)
    if tuple(w_scale.shape) != (n, groups):
        raise ShapeError(f"int4_linear: w_scale must be [N, ceil(K/group_size)] = [{n}, {groups}] "
                         f"(K={k}, group_size={group_size}), got {tuple(w_scale.shape)}")
    if x_scale.numel() not in (1, xq[..., :1].numel()):
        raise ShapeError(f"int4_linear: x_scale must be [..., 1] matching xq {tuple(xq.shape)}, "
                         f"got {tuple(x_scale.shape)}")
    if bias is not None and bias.numel() != n:
        raise ShapeError(f"int4_linear: bias must have N={n} elements, got shape {tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ShapeError(f"int4_linear: out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    devices = {t.device for t in (xq, x_scale, w_packed, w_scale, bias) if t is not None}
    if len(devices) != 1:
        raise ShapeError(f"int4_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    return n, groups


def _raw_acc_k_split(xq, w_packed, group_size, k, x_packed, config, max_k):
    """Raw accumulator for K > max_k: exact int32 sums of even-aligned K-slices (<= max_k long), added in int64."""
    x2 = xq.reshape(-1, xq.shape[-1])
    acc = torch.zeros((x2.shape[0], w_packed.shape[0]), dtype=torch.int64, device=xq.device)
    for start, stop in k_chunks(k, max_k, align=2):  # even starts: slices begin on a byte of the packed layout
        xs = x2[:, start // 2:(stop + 1) // 2] if x_packed else x2[:, start:stop]
        acc += int4_linear_acc(xs, w_packed[:, start // 2:(stop + 1) // 2], group_size, k=stop - start,
                               x_packed=x_packed, config=config).to(torch.int64)
    return acc.reshape(*xq.shape[:-1], w_packed.shape[0])


def _launch(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype, k, x_packed, raw_acc=False, config=None,
            max_k=None):
    """(1) check shapes, (2) allocate, (3) launch. k = logical K; config bypasses autotune (tests, compile checks).
    max_k: longest K one int32 accumulator may sum (default max_exact_k(128, 8); tests lower it)."""
    n, groups = _check_inputs(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype, k)
    max_k = max_k or max_exact_k(INT8_MAG, INT4_MAG)
    if raw_acc and k > max_k:
        return _raw_acc_k_split(xq, w_packed, group_size, k, x_packed, config, max_k)
    if not raw_acc and groups > 1 and group_size > max_k:
        raise AccumulatorOverflowError(
            f"int4_linear: group_size={group_size} lets one group's int32 accumulator reach {group_size} * 128 * 8, "
            f"past 2**31 - 1; quantize with group_size <= {max_k} (or -1, per channel, which the kernel chunks)")
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, xq.shape[-1])
    m = x2.shape[0]
    xs = x_scale.to(torch.float32).reshape(-1)
    stride_xs = 0 if xs.numel() == 1 else xs.stride(0)
    ws = w_scale.to(torch.float32)
    stride_wsg = ws.stride(1)
    if groups == 1:  # per-channel: chunk K so the loop and split-K have units to work with; same scale each chunk
        chunk = min(_PER_CHANNEL_CHUNK, max(max_k // 2 * 2, 2))
        group_size, groups, stride_wsg = chunk, -(-k // chunk), 0
    split = config["SPLIT_K"] > 1 if config else (m <= _SPLIT_K_MAX_M and k >= _SPLIT_K_MIN_K and groups > 1)
    acc_dtype = torch.int32 if raw_acc else (torch.float32 if split else out_dtype)
    out = (torch.zeros if split else torch.empty)((m, n), dtype=acc_dtype, device=xq.device)
    if m > 0 and n > 0:
        args = (x2, xs, w_packed, ws, bias if bias is not None else xs, out, m, n, k, (k + 1) // 2, group_size, groups,
                x2.stride(0), x2.stride(1), w_packed.stride(0), w_packed.stride(1), ws.stride(0), stride_wsg,
                stride_xs, out.stride(0), out.stride(1))
        flags = {"X_PACKED": x_packed, "EVEN_GROUPS": group_size % 2 == 0, "HAS_BIAS": bias is not None,
                 "RAW_ACC": raw_acc}
        if config is not None:
            grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
            _int4_linear_kernel[grid](*args, **flags, **config)
        else:
            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
            (_int4_linear_split_k if split else _int4_linear_tiled)[grid](*args, **flags)
    if not raw_acc and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out.reshape(*lead, n)


def int4_linear(xq, x_scale, w_packed, w_scale, bias=None, group_size=128, out_dtype=torch.bfloat16, *, max_k=None):
    """Triton launcher with the `qvla::int4_linear` contract (W4A8, or W4A4 with int4 values in int8 containers)."""
    return _launch(xq, x_scale, w_packed, w_scale, bias, group_size, out_dtype, k=xq.shape[-1], x_packed=False,
                   max_k=max_k)


def int4_linear_packed_act(xq_packed, x_scale, w_packed, w_scale, bias, group_size, out_dtype, k):
    """W4A4 with activations packed like the weights (from `quantize_act_packed_int4`); k = logical K."""
    if xq_packed.shape[-1] != (k + 1) // 2:
        raise ShapeError(f"int4_linear_packed_act: xq_packed must be [..., ceil(K/2)] = [..., {(k + 1) // 2}] "
                         f"for K={k}, got {tuple(xq_packed.shape)}")
    return _launch(xq_packed, x_scale, w_packed, w_scale, bias, group_size, out_dtype, k=k, x_packed=True)


def int4_linear_acc(xq, w_packed, group_size, k=None, x_packed=False, config=None, *, max_k=None):
    """Debug path: raw sum_g acc_g = xq @ unpack(w).T with unit scales and no bias, shape [..., N]; int32, or int64
    when K was split (K > max_k)."""
    k = xq.shape[-1] if k is None else k
    n, groups = w_packed.shape[0], -(-k // group_size)
    ones_x = torch.ones((1,), dtype=torch.float32, device=xq.device)
    ones_w = torch.ones((n, groups), dtype=torch.float32, device=xq.device)
    return _launch(xq, ones_x, w_packed, ones_w, None, group_size, torch.float32, k=k, x_packed=x_packed,
                   raw_acc=True, config=config, max_k=max_k)


def unpack_int4_weight_ref(w_packed: torch.Tensor, k: int) -> torch.Tensor:
    """[N, ceil(K/2)] packed signed nibbles -> [N, K] int8 values in [-8, 7]."""
    p = w_packed.to(torch.int16) & 0xFF
    vals = torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)[..., :k]
    return torch.where(vals >= 8, vals - 16, vals).to(torch.int8)


int4_linear_ref = ops.int4_linear_ref  # the reference: int64 per-group sums, float64 scaling, one final rounding


def bitplane_linear(xq, x_scale, w_planes, w_scale, bias, bits, group_size, out_dtype):
    """`qvla::bitplane_linear` on the GPU: the 2-/3-bit weights repacked to int4 nibbles (exact: every value fits a
    nibble), then the int4 kernel. The repack runs at every call (a few elementwise kernels over [N, K]): no kernel
    reads the bit-planes directly."""
    w4 = pack_int4(unpack_bitplanes(w_planes, bits, xq.shape[-1]))
    return int4_linear(xq, x_scale, w4, w_scale, bias, group_size, out_dtype)
