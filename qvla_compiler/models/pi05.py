"""pi0.5 reference policy: PaliGemma prefix (SigLIP + Gemma, MQA) and an adaRMS Gemma action expert.

Prefix: [image tokens ; text tokens ; discretised state tokens] run once through the language model, bidirectionally
under the padding mask; it yields the post-RoPE K/V of every layer. Denoise step: the expert (same layer count, heads
and head_dim) embeds the noisy actions, conditions every norm on the flow time via adaRMS, and at layer i its queries
attend to [prefix K_i ; expert K_i]. All attention is explicit matmul + softmax, as pi0.5's eager Gemma path.
Weights are random; names follow lerobot/openpi so the compiler's linear classification sees the real layout.
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
    eager_attention,
    init_modulation,
    init_weights,
    merge_heads,
    rms_normalize,
    rope_cos_sin,
    sinusoidal_embedding,
    split_heads,
    to_dtype,
)
from qvla_compiler.models.sampling import FlowSchedule


@dataclass(frozen=True)
class Pi05Config:
    """Sizes of a pi0.5 policy. The language model and the expert share `layers`, `heads` and `head_dim`."""

    vision: VisionConfig
    vocab_size: int
    max_tokens: int
    width: int  # language model (Gemma) width
    layers: int
    heads: int
    head_dim: int
    mlp: int
    expert_width: int
    expert_mlp: int
    horizon: int
    action_dim: int
    state_dim: int
    state_bins: int = 256  # the state enters as discretised text tokens, as pi0.5's processor does
    state_token_offset: int = 0  # first token id of the state bins (vocab_size - state_bins keeps them off the words)
    num_steps: int = 10
    rope_base: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.state_token_offset + self.state_bins > self.vocab_size:
            raise ValueError(f"Pi05Config: state_token_offset + state_bins ({self.state_token_offset} + "
                             f"{self.state_bins}) must be <= vocab_size ({self.vocab_size})")
        if self.head_dim % 2:
            raise ValueError(f"Pi05Config: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def prefix_len(self) -> int:
        return self.vision.num_patches + self.max_tokens + self.state_dim


class GatedMLP(nn.Module):
    """Gemma MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class MQAttention(nn.Module):
    """Multi-query attention projections: `heads` query heads, one shared K/V head of `head_dim`."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, head_dim, bias=False)
        self.v_proj = nn.Linear(width, head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, width, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, T, hd] and k, v [B, 1, T, hd]; RoPE applied to q and k."""
        q = apply_rope(split_heads(self.q_proj(x), self.heads), cos, sin)
        k = apply_rope(split_heads(self.k_proj(x), 1), cos, sin)
        return q, k, split_heads(self.v_proj(x), 1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        k, v = k.expand(-1, self.heads, -1, -1), v.expand(-1, self.heads, -1, -1)  # MQA: share the one KV head
        return self.o_proj(merge_heads(eager_attention(q, k, v, mask)))


class GemmaLayer(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps, unit_offset=True)
        self.self_attn = MQAttention(cfg.width, cfg.heads, cfg.head_dim)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps, unit_offset=True)
        self.mlp = GatedMLP(cfg.width, cfg.mlp)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        x = x + self.self_attn.attend(q, k, v, mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k[:, 0], v[:, 0]


class GemmaModel(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(GemmaLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.eps, unit_offset=True)


class AdaRMSNorm(nn.Module):
    """RMS norm modulated by a condition: y = rms(x)(1 + scale) + shift; also returns the residual gate."""

    def __init__(self, width: int, cond_width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_width, 3 * width)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)
        return rms_normalize(x, self.eps) * (1.0 + scale) + shift, gate


class ExpertLayer(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        w = cfg.expert_width
        self.input_layernorm = AdaRMSNorm(w, w, cfg.eps)
        self.self_attn = MQAttention(w, cfg.heads, cfg.head_dim)
        self.post_attention_layernorm = AdaRMSNorm(w, w, cfg.eps)
        self.mlp = GatedMLP(w, cfg.expert_mlp)

    def forward(self, x, cond, cos, sin, prefix_k: Tensor, prefix_v: Tensor, mask: Tensor) -> Tensor:
        normed, gate = self.input_layernorm(x, cond)
        q, k, v = self.self_attn.qkv(normed, cos, sin)
        k = torch.cat([prefix_k[:, None], k], dim=2)
        v = torch.cat([prefix_v[:, None], v], dim=2)
        x = x + self.self_attn.attend(q, k, v, mask) * gate  # gated residual
        normed, gate = self.post_attention_layernorm(x, cond)
        return x + self.mlp(normed) * gate


class ActionExpert(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(cfg) for _ in range(cfg.layers))
        self.norm = AdaRMSNorm(cfg.expert_width, cfg.expert_width, cfg.eps)


class Pi05Policy(FlowPolicy):
    """pi0.5 with random weights. Prefix tuple: (prefix_k, prefix_v, prefix_mask, prefix_hidden), see `embed_prefix`.

    Example::

        policy = Pi05Policy(PRESETS["pi05-tiny"])
        obs = policy.example_inputs(batch=2)
        actions = policy.sample_actions(**obs, noise=policy.example_noise(batch=2))  # [2, horizon, action_dim]
    """

    def __init__(self, config: Pi05Config):
        super().__init__()
        self.config = config
        self.schedule = FlowSchedule.uniform(1.0, 0.0, config.num_steps)
        self.vision = SiglipVisionTower(config.vision, eager_attention)
        self.multi_modal_projector = nn.Linear(config.vision.width, config.width)
        self.language_model = GemmaModel(config)
        w = config.expert_width
        self.action_expert = ActionExpert(config)
        self.action_in_proj = nn.Linear(config.action_dim, w)
        self.time_mlp_in = nn.Linear(w, w)
        self.time_mlp_out = nn.Linear(w, w)
        self.action_out_proj = nn.Linear(w, config.action_dim)
        self._init_weights()
        self.eval()

    def _init_weights(self) -> None:
        init_weights(self)
        with torch.no_grad():  # Gemma multiplies embeddings by sqrt(width): keep the product unit-scale
            self.language_model.embed_tokens.weight.normal_(0.0, self.config.width**-0.5)
        w = self.config.expert_width
        for m in self.action_expert.modules():
            if isinstance(m, AdaRMSNorm):  # (scale, shift, gate) biases (0, 0, 1): near-identity, time still matters
                init_modulation(m.dense, torch.cat([torch.zeros(2 * w), torch.ones(w)]))

    def _state_tokens(self, state: Tensor) -> Tensor:
        # pi0.5 writes the state into the prompt as 256-bin tokens; here they are token ids
        # state_token_offset .. state_token_offset + state_bins - 1
        bins = self.config.state_bins
        return ((state + 1.0) * 0.5 * bins).floor().clamp(0, bins - 1).long() + self.config.state_token_offset

    def embed_prefix(self, images: Tensor, tokens: Tensor, token_mask: Tensor, state: Tensor) -> tuple[Tensor, ...]:
        """Run the VLM once. Returns (prefix_k, prefix_v, prefix_mask, prefix_hidden):

        prefix_k, prefix_v [B, layers, T, head_dim]: post-RoPE keys / values of the single KV head of every layer;
        prefix_mask [B, T] bool: valid prefix tokens; prefix_hidden [B, T, width]: final-norm output (unused by the
        expert, returned so the whole VLM stays in the graph). T = image patches + max_tokens + state_dim.
        """
        lm = self.language_model
        img = self.multi_modal_projector(self.vision(to_dtype(images, self.dtype)))
        state_ids = self._state_tokens(state)
        txt = lm.embed_tokens(torch.cat([tokens, state_ids], dim=1)) * math.sqrt(self.config.width)
        x = torch.cat([img, txt], dim=1)
        valid = torch.cat(
            [token_mask.new_ones(img.shape[:2]), token_mask, token_mask.new_ones(state_ids.shape)], dim=1
        )
        positions = valid.long().cumsum(-1) - 1
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_base)
        attn_mask = valid[:, None, None, :]  # bidirectional prefix; pads are never attended to
        keys, values = [], []
        for layer in lm.layers:
            x, k, v = layer(x, cos, sin, attn_mask)
            keys.append(k)
            values.append(v)
        return torch.stack(keys, dim=1), torch.stack(values, dim=1), valid, lm.norm(x)

    def denoise_step(self, prefix: tuple[Tensor, ...], x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity [B, horizon, action_dim] of the flow at time t [B] (t = 1 noise, t = 0 data)."""
        prefix_k, prefix_v, prefix_mask = prefix[0], prefix[1], prefix[2]
        cfg = self.config
        x_t = to_dtype(x_t, self.dtype)
        t_emb = sinusoidal_embedding(t, cfg.expert_width, min_period=4e-3, max_period=4.0).type_as(x_t)
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(t_emb))))
        x = self.action_in_proj(x_t)
        # action positions continue after the valid prefix tokens
        n_valid = prefix_mask.long().sum(-1, keepdim=True)
        positions = n_valid + torch.arange(cfg.horizon, device=x_t.device)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
        # actions see every valid prefix token and every action token
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(prefix_mask.shape[0], cfg.horizon)], dim=1)
        mask = mask[:, None, None, :]
        for i, layer in enumerate(self.action_expert.layers):
            x = layer(x, cond, cos, sin, prefix_k[:, i], prefix_v[:, i], mask)
        x, _ = self.action_expert.norm(x, cond)
        return self.action_out_proj(x)
