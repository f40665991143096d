"""Building blocks shared by the reference policies: norms, RoPE, attention, the SigLIP-like tower, time embeddings.

Everything here is export-friendly: no data-dependent Python control flow, no `.item()`, shapes derived from the
config (static) or from the batch dimension (symbolic). Attention comes in two interchangeable flavours with one
signature, `attention(q, k, v, mask)`: explicit matmul + softmax (pi0.5, as its eager Gemma does) and
`F.scaled_dot_product_attention` (GR00T, as diffusers / Qwen3 do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvla_compiler.models.sampling import FlowSchedule, euler_sample

AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


# ---------------------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """RMS norm. `unit_offset=True` is Gemma's `x * (1 + w)` (w starts near 0); False is Llama/Qwen's `x * w`."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = 1.0 + self.weight.float() if self.unit_offset else self.weight.float()
        return (normed * weight).type_as(x)


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


# ----------------------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, T, head_dim] for integer `positions` [B, T] (HF "rotate_half" layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` [B, heads, T, head_dim] by the tables from `rope_cos_sin` [B, T, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


# ------------------------------------------------------------------------------------------------------ attention
def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(d) masked) v with explicit ops; `mask` is bool, True = may attend, broadcast to scores."""
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    return probs @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Same contract as `eager_attention`, through `F.scaled_dot_product_attention`."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def to_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """`x` in `dtype`; no op (and no graph node) when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, T, heads*hd] -> [B, heads, T, hd]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, heads, T, hd] -> [B, T, heads*hd]."""
    return x.transpose(1, 2).flatten(2)


# ----------------------------------------------------------------------------------------------- time embeddings
def sinusoidal_embedding(
    t: Tensor, dim: int, *, min_period: float, max_period: float, cos_first: bool = False
) -> Tensor:
    """[..., dim] sin/cos features of `t` at dim//2 frequencies 2π/period, periods geometric in [min, max]."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** fraction
    angles = t.float()[..., None] * (2.0 * math.pi / period)
    parts = [angles.cos(), angles.sin()] if cos_first else [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------------------------- SigLIP-like tower
@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp: int
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or self.width % self.heads:
            raise ValueError(f"VisionConfig: image_size must be a multiple of patch_size and width of heads: {self}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, attention: AttentionFn):
        super().__init__()
        self.heads = cfg.heads
        self.attention = attention
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(self.attention(q, k, v, None)))


class SiglipMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, attention: AttentionFn):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SiglipAttention(cfg, attention)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = SiglipMLP(cfg.width, cfg.mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> patch features [B, num_patches, width] (after `post_layernorm`)."""

    def __init__(self, cfg: VisionConfig, attention: AttentionFn):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)
        self.layers = nn.ModuleList(SiglipLayer(cfg, attention) for _ in range(cfg.layers))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images * 2.0 - 1.0).flatten(2).transpose(1, 2)  # SigLIP normalises to [-1, 1]
        x = x + self.position_embedding.weight
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


# ---------------------------------------------------------------------------------------------------- random init
def init_weights(module: nn.Module) -> None:
    """Random weights that give unit-scale activations and non-trivial norm gains (so folding bugs would show).

    Linear / conv: N(0, 1/fan_in), bias N(0, 0.02²). Embeddings N(0, 1). Norm gains perturbed by N(0, 0.1²).
    Policies then re-initialise their own special modules (adaRMS / AdaLN modulation, Gemma embeddings).
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, fan_in**-0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 1.0)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.02)
            elif isinstance(m, RMSNorm):
                m.weight.normal_(0.0 if m.unit_offset else 1.0, 0.1)


def init_modulation(linear: nn.Linear, bias: Tensor) -> None:
    """Small random (not zero) weights for an adaptive-norm linear, so the time condition matters; set bias."""
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.2 * linear.in_features**-0.5)
        linear.bias.copy_(bias + 0.02 * torch.randn_like(bias))


# --------------------------------------------------------------------------------------------- observation I/O
def random_observation(
    gen: torch.Generator, batch: int, image_size: int, vocab_size: int, max_tokens: int, state_dim: int
) -> dict[str, Tensor]:
    """A plausible observation: smooth images in [0, 1], right-padded token ids (pad 0) with random lengths, state."""
    coarse = torch.rand(batch, 3, 4, 4, generator=gen)
    images = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0.0, 1.0)
    lengths = torch.randint(1, max_tokens + 1, (batch,), generator=gen)
    token_mask = torch.arange(max_tokens)[None, :] < lengths[:, None]
    tokens = torch.randint(1, vocab_size, (batch, max_tokens), generator=gen) * token_mask
    state = (0.5 * torch.randn(batch, state_dim, generator=gen)).clamp(-1.0, 1.0)
    return {"images": images, "tokens": tokens, "token_mask": token_mask, "state": state}


class FlowPolicy(nn.Module):
    """Shared policy surface: sampling through `euler_sample` and deterministic example / calibration data.

    Subclasses define `config` (with image_size, max_tokens, state_dim, horizon, action_dim, vocab_size),
    `schedule`, `embed_prefix(images, tokens, token_mask, state) -> tuple[Tensor, ...]` and
    `denoise_step(prefix, x_t, t) -> Tensor`.
    """

    config: object
    schedule: FlowSchedule
    _EXAMPLE_SEED = 1234

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the policy computes in: its weights' (fp32 or bf16). Float inputs (images, state, noise) are cast
        to it on entry, so callers may pass fp32 observations to a bf16 policy; actions come back in the noise's dtype
        (the Euler update accumulates there)."""
        return self.vision.patch_embed.weight.dtype

    @torch.no_grad()
    def sample_actions(self, images: Tensor, tokens: Tensor, token_mask: Tensor, state: Tensor, *, noise: Tensor):
        obs = {"images": images, "tokens": tokens, "token_mask": token_mask, "state": state}
        return euler_sample(self.embed_prefix, self.denoise_step, obs, noise, self.schedule)

    def _observation(self, gen: torch.Generator, batch: int) -> dict[str, Tensor]:
        c = self.config
        return random_observation(gen, batch, c.image_size, c.vocab_size, c.max_tokens, c.state_dim)

    def example_inputs(self, batch: int = 2) -> dict[str, Tensor]:
        return self._observation(torch.Generator().manual_seed(self._EXAMPLE_SEED), batch)

    def example_noise(self, batch: int = 2, seed: int = 0) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.config.horizon, self.config.action_dim, generator=gen)

    def calibration_batches(self, n: int, seed: int = 0, batch: int = 2) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            yield self._observation(gen, batch)
