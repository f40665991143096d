"""Per-token absmax activation quantization (int8 or int4 values) as one Triton pass over each row.

Semantics of `qvla::quantize_act(x, bits, static_scale) -> (q, scale)`:
    qmax  = 2**(bits-1) - 1                                   (127 for int8, 7 for int4)
    scale = static_scale, or max(amax(|x|, -1) / qmax, 1e-8)  fp32, shape [..., 1] (a static scale is not clamped)
    q     = clamp(round_half_even(x / scale), -qmax, qmax)    int8 container, shape [..., K]
    a row holding a NaN or +-Inf gets scale NaN (q unspecified), so its outputs are NaN as in float
`quantize_act_packed_int4` additionally packs int4 values two per byte along K (low nibble = even k), the layout
`triton_int4_linear` reads for W4A4 with packed activations.

Bit-exactness with torch: the division is `div_rn` (IEEE round-to-nearest; fp32 `/` is approximate on NVIDIA GPUs),
the rounding is the magic-number trick (exact round-half-even for |v| < 2**22, applied after the clamp), and inputs are
upcast to fp32 right after the load (the interpreter cannot do bf16 arithmetic).
"""

import triton
import triton.language as tl
import torch
from triton import knobs

from qvla_compiler.errors import ShapeError

_INTERPRET = bool(knobs.runtime.interpret)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_SCALE = 1e-8
_MAX_SINGLE_PASS_K = 8192  # whole row in registers up to this width; longer rows loop twice (second read hits L2)
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds half-to-even for |v| < 2**22


@triton.jit
def _quantize_act_kernel(
    # pointers
    x_ptr, static_ptr, q_ptr, scale_ptr,
    # sizes and strides (rows are flattened tokens)
    K, stride_xm, stride_static, stride_qm,
    # meta-parameters
    QMAX: tl.constexpr,          # 127.0 or 7.0
    HAS_STATIC: tl.constexpr,    # use static_ptr instead of the row absmax
    PACK_INT4: tl.constexpr,     # store two int4 values per byte (low nibble = even k)
    SINGLE_PASS: tl.constexpr,   # BLOCK_K >= K: load the row once
    BLOCK_K: tl.constexpr,
):
    # -- block 1: which row ------------------------------------------------------------------------
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)

    # -- block 2: the scale (fp32; a single-pass row stays in registers) ---------------------------
    if SINGLE_PASS:
        x_full = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
    if HAS_STATIC:
        scale = tl.load(static_ptr + row * stride_static).to(tl.float32)
    else:
        if SINGLE_PASS:
            amax = tl.max(tl.abs(x_full), axis=0)
        else:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(xk))
            amax = tl.max(amax, axis=0)
        scale = tl.maximum(tl.math.div_rn(amax, QMAX), 1e-8)  # an all-zero row gets scale 1e-8, q = 0

    # -- block 3: quantize (clamp before rounding and before the int8 cast) ------------------------
    poison = tl.zeros((BLOCK_K,), dtype=tl.float32)  # x * 0: +-0 where finite, NaN where x is NaN or +-inf
    for k0 in range(0, K, BLOCK_K):
        if SINGLE_PASS:
            xk = x_full
        else:
            xk = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        poison += xk * 0.0
        v = tl.clamp(tl.math.div_rn(xk, scale), -QMAX, QMAX)
        v = tl.where(v == v, v, 0.0)  # NaN quotients (NaN x, inf/inf) quantize to 0, never an undefined cast
        q = ((v + 12582912.0) - 12582912.0).to(tl.int8)
        if PACK_INT4:
            lo, hi = tl.split(tl.reshape(q, (BLOCK_K // 2, 2)))
            packed = (hi << 4) | (lo & 0xF)
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            tl.store(q_row + offs_p, packed, mask=offs_p < (K + 1) // 2)
        else:
            tl.store(q_row + k0 + offs, q, mask=k0 + offs < K)

    # -- block 4: the scale, NaN for a row holding a NaN/Inf (tl.max drops NaN on GPUs; a static scale ignores x),
    # so every output of that token is NaN as in float. Gathered in the quantize loop: no extra pass over x.
    tl.store(scale_ptr + row, scale + tl.sum(poison, axis=0))


def get_autotune_configs() -> list:
    """Warps per row; BLOCK_K is chosen by the launcher from K (single pass when the row fits)."""
    if _INTERPRET:
        return [triton.Config({}, num_warps=4)]
    return [
        triton.Config({}, num_warps=1),
        triton.Config({}, num_warps=2),
        triton.Config({}, num_warps=4),
        triton.Config({}, num_warps=8),
        triton.Config({}, num_warps=16),  # K = 16384 single pass
    ]


def _prune_single(configs, named_args, **kwargs):
    return configs[:1]


_quantize_act_tuned = triton.autotune(
    configs=get_autotune_configs(),
    key=["K", "HAS_STATIC", "PACK_INT4"],
    prune_configs_by={"early_config_prune": _prune_single} if _INTERPRET else None,
)(_quantize_act_kernel)


def _check_inputs(x: torch.Tensor, bits: int, static_scale):
    if bits not in (4, 8):
        raise ShapeError(f"quantize_act: bits must be 4 or 8, got {bits}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ShapeError(f"quantize_act: x must be float32/float16/bfloat16, got {x.dtype}; dequantize first")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ShapeError(f"quantize_act: x must have a non-empty last (K) dimension, got shape {tuple(x.shape)}")
    if static_scale is not None:
        try:
            torch.broadcast_shapes(static_scale.shape, (*x.shape[:-1], 1))
        except RuntimeError:
            raise ShapeError(
                f"quantize_act: static_scale of shape {tuple(static_scale.shape)} does not broadcast to "
                f"{(*x.shape[:-1], 1)}; pass a scalar or one scale per token"
            ) from None


def _launch(x: torch.Tensor, bits: int, static_scale, pack_int4: bool):
    _check_inputs(x, bits, static_scale)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q_cols = (K + 1) // 2 if pack_int4 else K
    q = torch.empty((M, q_cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if static_scale is not None:
        static = static_scale.to(device=x.device, dtype=torch.float32).expand(*lead, 1).reshape(-1)
        stride_static = static.stride(0) if static.numel() > 1 else 0
    else:
        static, stride_static = scale, 0  # unused pointer
    block_k = max(triton.next_power_of_2(K), 2)
    single_pass = block_k <= _MAX_SINGLE_PASS_K
    if not single_pass:
        block_k = 2048
    if M > 0:
        _quantize_act_tuned[(M,)](
            x2, static, q, scale,
            K, x2.stride(0), stride_static, q.stride(0),
            QMAX=float(2 ** (bits - 1) - 1), HAS_STATIC=static_scale is not None, PACK_INT4=pack_int4,
            SINGLE_PASS=single_pass, BLOCK_K=block_k,
        )
    return q.reshape(*lead, q_cols), scale.reshape(*lead, 1)


def quantize_act(x: torch.Tensor, bits: int, static_scale: torch.Tensor | None = None):
    """Triton launcher with the `qvla::quantize_act` contract; returns (q int8 [..., K], scale fp32 [..., 1])."""
    return _launch(x, bits, static_scale, pack_int4=False)


def quantize_act_packed_int4(x: torch.Tensor, static_scale: torch.Tensor | None = None):
    """4-bit quantization with q packed two per byte along K: (q int8 [..., ceil(K/2)], scale fp32 [..., 1])."""
    return _launch(x, 4, static_scale, pack_int4=True)


def quantize_act_ref(x: torch.Tensor, bits: int, static_scale: torch.Tensor | None = None):
    """Pure-torch reference (fp32 scale as the op defines it; the quotient is computed exactly in fp32).
    A row with a NaN/Inf gets scale NaN (0 * amax is NaN exactly then); its q is unspecified."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    if static_scale is None:
        scale = (amax / qmax).clamp_min(_MIN_SCALE)
    else:
        scale = static_scale.float().expand(*x.shape[:-1], 1)
    q = torch.round(xf / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, (scale + 0.0 * amax).contiguous()


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 container, [-8, 7]) two per byte along the last dim; odd K gets a zero high nibble."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    lo = q[..., 0::2].to(torch.int16) & 0xF
    hi = q[..., 1::2].to(torch.int16) & 0xF
    return ((hi << 4) | lo).to(torch.uint8).view(torch.int8)


def unpack_int4_ref(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4_ref: signed nibbles back to int8 values, trimmed to k columns."""
    p = packed.to(torch.int16) & 0xFF
    lo = p & 0xF
    hi = p >> 4
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :k]
    return torch.where(vals >= 8, vals - 16, vals).to(torch.int8)
