"""GR00T N1.5 reference policy: Eagle-like backbone (SigLIP + truncated Qwen3) and a flow-matching DiT action head.

Prefix (once per observation): image patches -> `mlp1` -> [image ; text] through a Qwen3 stack cut after its last kept
layer (causal + padding mask, GQA, q/k norms, no final norm) -> `action_head.vlln`; the state goes through the
top-level `state_encoder`. Denoise step: the DiT runs on [state (1) ; future tokens ; noisy actions (horizon)], even
blocks cross-attending to the VL features and odd blocks self-attending, AdaLayerNorm on the discretised time.
Attention is `F.scaled_dot_product_attention` everywhere, as in diffusers / HF Qwen3. The original's
embodiment-specific linears (`CategorySpecificLinear`) are plain `nn.Linear` here (one embodiment sliced out), and
the 4 `vl_self_attention` blocks are omitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvla_compiler.models.common import (
    FlowPolicy,
    RMSNorm,
    SiglipVisionTower,
    VisionConfig,
    apply_rope,
    init_modulation,
    init_weights,
    merge_heads,
    rope_cos_sin,
    sdpa_attention,
    sinusoidal_embedding,
    split_heads,
    to_dtype,
)
from qvla_compiler.models.sampling import FlowSchedule

_TIMESTEP_CHANNELS = 256  # diffusers Timesteps(256) in GR00T's TimestepEncoder


@dataclass(frozen=True)
class GrootConfig:
    """Sizes of a GR00T N1.5 policy. DiT width = dit_heads * dit_head_dim (the original's inner dim)."""

    vision: VisionConfig
    vocab_size: int
    max_tokens: int
    width: int  # language model (Qwen3) width = cross-attention dim of the DiT
    layers: int  # kept (truncated) language-model layers
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    dit_ff: int
    output_dim: int  # proj_out_2 width, input of action_decoder
    state_hidden: int
    decoder_hidden: int
    horizon: int
    action_dim: int
    state_dim: int
    num_future_tokens: int
    num_steps: int = 4
    num_timestep_buckets: int = 1000
    rope_base: float = 1_000_000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads or self.head_dim % 2:
            raise ValueError(f"GrootConfig: heads must be a multiple of kv_heads and head_dim even: {self}")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def dit_width(self) -> int:
        return self.dit_heads * self.dit_head_dim


# ------------------------------------------------------------------------------------------------ Qwen3 backbone
class Qwen3Attention(nn.Module):
    def __init__(self, cfg: GrootConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.q_proj = nn.Linear(cfg.width, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.width, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        q = apply_rope(self.q_norm(split_heads(self.q_proj(x), self.heads)), cos, sin)
        k = apply_rope(self.k_norm(split_heads(self.k_proj(x), self.kv_heads)), cos, sin)
        v = split_heads(self.v_proj(x), self.kv_heads)
        groups = self.heads // self.kv_heads  # GQA: each KV head serves `groups` consecutive query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return self.o_proj(merge_heads(sdpa_attention(q, k, v, mask)))


class SiluMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: GrootConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.mlp = SiluMLP(cfg.width, cfg.mlp)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Truncated Qwen3: the features are the hidden states after the last kept layer (no final norm)."""

    def __init__(self, cfg: GrootConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(Qwen3Layer(cfg) for _ in range(cfg.layers))


# ------------------------------------------------------------------------------------------------------- DiT head
class TwoLayerMLP(nn.Module):
    """layer2(relu(layer1(x))): GR00T's state encoder and action decoder (one embodiment)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.layer1 = nn.Linear(dim_in, hidden)
        self.layer2 = nn.Linear(hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(F.relu(self.layer1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(_TIMESTEP_CHANNELS, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, timesteps: Tensor) -> Tensor:
        # diffusers Timesteps(256, flip_sin_to_cos=True): frequencies 1 .. 1e-4 (periods 2π .. 2π·1e4), cos first
        emb = sinusoidal_embedding(
            timesteps, _TIMESTEP_CHANNELS, min_period=2 * math.pi, max_period=2e4 * math.pi, cos_first=True
        )
        return self.linear_2(F.silu(self.linear_1(to_dtype(emb, self.linear_1.weight.dtype))))


class ActionEncoder(nn.Module):
    """W3(swish(W2([W1(a) ; sinusoid(t)]))): the multi-embodiment action encoder for one embodiment."""

    def __init__(self, action_dim: int, width: int):
        super().__init__()
        self.width = width
        self.W1 = nn.Linear(action_dim, width)
        self.W2 = nn.Linear(2 * width, width)
        self.W3 = nn.Linear(width, width)

    def forward(self, actions: Tensor, timesteps: Tensor) -> Tensor:
        a_emb = self.W1(actions)
        tau = sinusoidal_embedding(timesteps, self.width, min_period=2 * math.pi, max_period=2e4 * math.pi)
        tau = tau[:, None, :].expand(-1, actions.shape[1], -1).type_as(a_emb)
        return self.W3(F.silu(self.W2(torch.cat([a_emb, tau], dim=-1))))


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine) modulated by SiLU(temb): y = norm(x)(1 + scale) + shift."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        return self.norm(x) * (1.0 + scale) + shift


class DiTAttention(nn.Module):
    """diffusers-style attention; `kv_dim` differs from `width` in the cross-attending blocks."""

    def __init__(self, width: int, kv_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(width, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, width), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(context), self.heads)
        v = split_heads(self.to_v(context), self.heads)
        out = merge_heads(sdpa_attention(q, k, v, mask))
        return self.to_out[1](self.to_out[0](out))


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(width, hidden), nn.Dropout(0.0), nn.Linear(hidden, width)])

    def forward(self, x: Tensor) -> Tensor:
        for module in self.net:
            x = module(x)
        return x


class DiTBlock(nn.Module):
    def __init__(self, cfg: GrootConfig, cross: bool):
        super().__init__()
        w = cfg.dit_width
        self.cross = cross
        self.norm1 = AdaLayerNorm(w)
        self.attn1 = DiTAttention(w, cfg.width if cross else w, cfg.dit_heads, cfg.dit_head_dim)
        self.norm3 = nn.LayerNorm(w, eps=1e-5, elementwise_affine=False)
        self.ff = FeedForward(w, cfg.dit_ff)

    def forward(self, x: Tensor, temb: Tensor, vl: Tensor, vl_mask: Tensor) -> Tensor:
        normed = self.norm1(x, temb)
        if self.cross:  # static per block: even blocks cross-attend to the VL features, odd ones self-attend
            x = x + self.attn1(normed, vl, vl_mask[:, None, None, :])
        else:
            x = x + self.attn1(normed, normed, None)
        return x + self.ff(self.norm3(x))


class FlowMatchingActionHead(nn.Module):
    def __init__(self, cfg: GrootConfig):
        super().__init__()
        w = cfg.dit_width
        self.vlln = nn.LayerNorm(cfg.width)
        self.timestep_encoder = TimestepEncoder(w)
        self.action_encoder = ActionEncoder(cfg.action_dim, w)
        self.position_embedding = nn.Embedding(cfg.horizon, w)
        self.future_tokens = nn.Embedding(cfg.num_future_tokens, w)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg, cross=i % 2 == 0) for i in range(cfg.dit_layers))
        self.proj_out_1 = nn.Linear(w, 2 * w)
        self.norm_out = nn.LayerNorm(w, eps=1e-6, elementwise_affine=False)
        self.proj_out_2 = nn.Linear(w, cfg.output_dim)
        self.action_decoder = TwoLayerMLP(cfg.output_dim, cfg.decoder_hidden, cfg.action_dim)


class GrootPolicy(FlowPolicy):
    """GR00T N1.5 with random weights. Prefix tuple: (vl_features, vl_mask, state_features), see `embed_prefix`.

    Example::

        policy = GrootPolicy(PRESETS["groot-tiny"])
        obs = policy.example_inputs(batch=2)
        actions = policy.sample_actions(**obs, noise=policy.example_noise(batch=2))  # [2, horizon, action_dim]
    """

    def __init__(self, config: GrootConfig):
        super().__init__()
        self.config = config
        self.schedule = FlowSchedule.uniform(0.0, 1.0, config.num_steps)
        self.vision = SiglipVisionTower(config.vision, sdpa_attention)
        self.mlp1 = nn.Linear(config.vision.width, config.width)
        self.language_model = Qwen3Model(config)
        self.state_encoder = TwoLayerMLP(config.state_dim, config.state_hidden, config.dit_width)
        self.action_head = FlowMatchingActionHead(config)
        self._init_weights()
        self.eval()

    def _init_weights(self) -> None:
        init_weights(self)
        w = self.config.dit_width
        head = self.action_head
        for block in head.transformer_blocks:
            init_modulation(block.norm1.linear, torch.zeros(2 * w))
        init_modulation(head.proj_out_1, torch.zeros(2 * w))

    def embed_prefix(self, images: Tensor, tokens: Tensor, token_mask: Tensor, state: Tensor) -> tuple[Tensor, ...]:
        """Returns (vl_features [B, T, width] after `vlln`, vl_mask [B, T] bool, state_features [B, 1, dit_width]).

        T = image patches + max_tokens; the language model is causal over [image ; text] and ignores padding.
        """
        lm = self.language_model
        x = torch.cat([self.mlp1(self.vision(to_dtype(images, self.dtype))), lm.embed_tokens(tokens)], dim=1)
        n_img = x.shape[1] - tokens.shape[1]
        valid = torch.cat([token_mask.new_ones(token_mask.shape[0], n_img), token_mask], dim=1)
        seq = x.shape[1]
        positions = torch.arange(seq, device=x.device)[None, :]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_base)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        for layer in lm.layers:
            x = layer(x, cos, sin, mask)
        state_features = self.state_encoder(to_dtype(state, self.dtype)[:, None, :])
        return self.action_head.vlln(x), valid, state_features

    def denoise_step(self, prefix: tuple[Tensor, ...], x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity [B, horizon, action_dim] at flow time t [B] (t = 0 noise, t = 1 data), t bucketed to 1/1000."""
        vl, vl_mask, state_features = prefix[0], prefix[1], prefix[2]
        head = self.action_head
        x_t = to_dtype(x_t, self.dtype)
        timesteps = (t * self.config.num_timestep_buckets).floor()
        temb = head.timestep_encoder(timesteps).type_as(x_t)
        actions = head.action_encoder(x_t, timesteps) + head.position_embedding.weight
        future = head.future_tokens.weight[None].expand(x_t.shape[0], -1, -1)
        x = torch.cat([state_features, future, actions], dim=1)
        for block in head.transformer_blocks:
            x = block(x, temb, vl, vl_mask)
        shift, scale = head.proj_out_1(F.silu(temb))[:, None, :].chunk(2, dim=-1)
        x = head.proj_out_2(head.norm_out(x) * (1.0 + scale) + shift)
        return head.action_decoder(x[:, -self.config.horizon :])
