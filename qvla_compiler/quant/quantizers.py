"""Weight quantizers (a scale, no zero point; per output channel or per group) and their dequantizers. Pure tensor
functions."""
from __future__ import annotations

import math

import torch

from qvla_compiler.kernels.ops import LOWERINGS, qmax_for

_MSE_RATIOS = torch.linspace(0.5, 1.0, 21)  # clipping ratios tried per row (or group) by the MSE search
# ... and for a static activation scale, whose values have heavier tails than weights (at 4 bits the chosen clip on
# the small presets' per-step scales is 0.35-0.70 of the max, median 0.55: RESULTS §16)
_ACT_RATIOS = torch.linspace(0.05, 1.0, 39)
# What weight scales are stored in. int4's group scales in fp32 cost a quarter bit a weight at g=128 (4.25 bits:
# 73.4% saved against bf16); bf16 halves that (4.125 bits: 74.2%) with fp32's range, and the integers are rounded
# on the stored grid, so the kernels compute with exactly what is stored. int8's per-row scales stay fp32; the 2- and
# 3-bit group scales are bf16 like int4's.
SCALE_DTYPES = {8: torch.float32, 4: torch.bfloat16, 3: torch.bfloat16, 2: torch.bfloat16}


def stored_scale(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`scale` rounded to what a `bits`-bit weight's scales are stored in (SCALE_DTYPES)."""
    return scale.to(SCALE_DTYPES[bits])


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, group] with zero padding of the last group."""
    n, k = w.shape
    gs = k if group_size <= 0 or group_size >= k else group_size
    pad = (-k) % gs
    return torch.nn.functional.pad(w, (0, pad)).reshape(n, -1, gs)


def weight_low(bits: int) -> int:
    """The lowest integer a `bits`-bit weight takes. Below 8 bits every level of the two's-complement format,
    -2^(bits-1) (int4 [-8, 7]: 16 levels where a symmetric grid uses 15; 2 bits [-2, 1]: 4 levels, not ternary's
    3); at 8 bits the symmetric -127: the extra level would narrow the step by 1/255 and change every W8 program."""
    return -qmax_for(bits) - (1 if bits < 8 else 0)


def _scales(wg: torch.Tensor, qmax: int, clip: str, ratios: torch.Tensor = _MSE_RATIOS,
            weights: torch.Tensor | None = None, low: int | None = None) -> torch.Tensor:
    """Per row of wg [..., n]: the scale s of smallest |s| whose grid [low, qmax]·s covers the row, or with clip "mse"
    that s times r, r in `ratios`, minimising Σ weights·(Q(wg) − wg)² over the row, Q the grid with clamping.
    On the symmetric grid (low = -qmax, the default) s = absmax / qmax. On [-2^(b-1), 2^(b-1) - 1] the side with the
    extra level should face the row's larger side, so s is negative where that side is positive: q = round(w / s)
    then spans [-qmax·|s|, -low·|s|]. The kernels multiply by the stored scale whatever its sign."""
    low = -qmax if low is None else low
    if low == -qmax:  # reach [N, G]: what level qmax stands for, s = reach / qmax
        reach = wg.abs().amax(-1).clamp_min(1e-8)
    else:
        hi, lo = wg.amax(-1), wg.amin(-1)
        below = torch.maximum(hi, lo * qmax / low)  # the extra level below zero
        above = torch.maximum(-lo, -hi * qmax / low)  # ... above zero: a negative scale
        reach = torch.where(above < below, -above, below.clamp_min(1e-8))
    if clip == "absmax":
        return reach / qmax
    best_err, best = None, None
    for ratio in ratios:
        s = reach * ratio / qmax
        err = (torch.clamp(torch.round(wg / s[..., None]), low, qmax) * s[..., None] - wg).pow(2)
        err = (err if weights is None else err * weights).sum(-1)
        take = err < best_err if best_err is not None else torch.ones_like(err, dtype=torch.bool)
        best_err = err if best_err is None else torch.where(take, err, best_err)
        best = s if best is None else torch.where(take, s, best)
    return best


def mse_clip_scale(values: torch.Tensor, weights: torch.Tensor, qmax: int) -> torch.Tensor:
    """A static activation scale, fp32 scalar: over the weighted values, max·r / qmax with r in _ACT_RATIOS
    minimising the squared quantization error (_scales)."""
    return _scales(values[None], qmax, "mse", _ACT_RATIOS, weights[None])[0].float()


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = -1, clip: str = "absmax"):
    """W [N, K] -> (integer weight, scales). bits 8: int8 [N, K], fp32 scales [N] (per channel, group ignored).
    bits 4, 3, 2: the packed integers of ops.LOWERINGS[bits] (int4: int8 [N, ceil(K/2)]; 3 and 2: uint8 bit-planes
    [N, bits, ceil(K/8)]) on the grid [weight_low(bits), 2^(bits-1) - 1], bf16 scales [N, G] (of either sign, see
    _scales) per group of `group_size` (-1: one group per row)."""
    w = w.detach().float()
    qmax = qmax_for(bits)
    wg = _grouped(w, -1 if bits == 8 else group_size)
    low = weight_low(bits)
    scale = stored_scale(_scales(wg, qmax, clip, low=low), bits).float()
    q = torch.clamp(torch.round(wg / scale[..., None]), low, qmax).to(torch.int8)
    q = q.reshape(w.shape[0], -1)[:, : w.shape[1]]
    if bits == 8:
        return q.contiguous(), scale[:, 0].contiguous()
    return LOWERINGS[bits].pack(q), stored_scale(scale, bits).contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, k: int, group_size: int = -1) -> torch.Tensor:
    """Inverse of quantize_weight, in fp32."""
    return dequantize_unpacked(LOWERINGS[bits].unpack(q, k).float(), scale.float(), group_size)


def dequantize_unpacked(w: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Integers [N, K] (held as floats) × their scales: [N] per channel, or [N, G] per group of `group_size`;
    differentiable in `scale` (scale tuning)."""
    if scale.dim() == 1:
        return w * scale[:, None]
    return (_grouped(w, group_size) * scale[..., None]).reshape(w.shape[0], -1)[:, : w.shape[1]]


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """20·log10(‖ref‖ / ‖ref − test‖); +inf when identical."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).norm()
    return math.inf if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def fake_quant_act(x: torch.Tensor, bits: int, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations exactly as qvla::quantize_act does, in fp32."""
    from qvla_compiler.kernels.ops import quantize_act_ref

    q, s = quantize_act_ref(x, bits, static_scale)
    return q.float() * s
