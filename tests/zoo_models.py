"""An architecture zoo: small modules (width ≤ 64) written the way real policies write attention and MLPs.

tests/passes/test_zoo.py pairs each with example inputs and its ground truth by module name (the last entry of a
linear's `nn_module_stack`): a role per name suffix and a region per name prefix. The passes never read names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

W, H, B, T = 32, 4, 2, 6  # width, heads, batch, tokens
HD = W // H


def _heads(x, heads=H):
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def _merge(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, t):
    inv = 1.0 / (10000 ** (torch.arange(0, x.shape[-1], 2, dtype=torch.float32) / x.shape[-1]))
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((ang, ang), dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


class SwiGLU(nn.Module):
    def __init__(self, width=W, hidden=64):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class InplaceAttention(nn.Module):
    """SmolVLA's eager attention: `*=` scale, `torch.where` mask, GQA by expand + reshape, `+=` residuals."""

    def __init__(self, kv_heads=2):
        super().__init__()
        self.kvh = kv_heads
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(W), nn.RMSNorm(W)
        self.q_proj, self.o_proj = nn.Linear(W, W, bias=False), nn.Linear(W, W, bias=False)
        self.k_proj, self.v_proj = nn.Linear(W, kv_heads * HD, bias=False), nn.Linear(W, kv_heads * HD, bias=False)
        self.mlp = SwiGLU()

    def _repeat(self, x):
        b, kvh, t, d = x.shape
        return x[:, :, None, :, :].expand(b, kvh, H // kvh, t, d).reshape(b, H, t, d)

    def forward(self, x, mask):
        h = self.input_layernorm(x)
        q, k, v = _heads(self.q_proj(h)), _heads(self.k_proj(h), self.kvh), _heads(self.v_proj(h), self.kvh)
        k, v = self._repeat(k), self._repeat(v)
        scores = torch.matmul(q, k.transpose(2, 3))
        scores *= HD ** -0.5
        scores = torch.where(mask[:, None, :, :], scores, torch.finfo(torch.float32).min)
        probs = F.softmax(scores, dim=-1).to(v.dtype)
        out = self.o_proj(_merge(torch.matmul(probs, v)))
        out += x
        residual = out
        y = self.mlp(self.post_attention_layernorm(out))
        y += residual
        return y


class CloneResidual(nn.Module):
    """SmolVLA's layer: the MLP output is added back onto a copy of the stream (`out_emb.clone()`), in a cast."""

    def __init__(self):
        super().__init__()
        self.norm, self.mlp = nn.RMSNorm(W), SwiGLU(W, 64)

    def forward(self, x):
        out = x.clone()
        return (out + self.mlp(self.norm(x)).to(torch.float32)).to(x.dtype)


class ParallelResidual(nn.Module):
    """GPT-J (one norm) then NeoX/PaLM (two norms): x + attn(ln(x)) + mlp(ln(x)), masked_fill causal mask."""

    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2a, self.ln_2b = nn.LayerNorm(W), nn.LayerNorm(W), nn.LayerNorm(W)
        self.attn1 = nn.ModuleDict({n: nn.Linear(W, W) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.attn2 = nn.ModuleDict({n: nn.Linear(W, W) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.mlp1 = nn.ModuleDict({"fc_in": nn.Linear(W, 64), "fc_out": nn.Linear(64, W)})
        self.mlp2 = nn.ModuleDict({"fc_in": nn.Linear(W, 64), "fc_out": nn.Linear(64, W)})

    @staticmethod
    def _attn(p, h):
        q, k, v = _heads(p["q_proj"](h)), _heads(p["k_proj"](h)), _heads(p["v_proj"](h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HD)
        causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return p["out_proj"](_merge(probs @ v))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self._attn(self.attn1, h) + self.mlp1["fc_out"](F.gelu(self.mlp1["fc_in"](h), approximate="tanh"))
        mlp2 = self.mlp2["fc_out"](F.gelu(self.mlp2["fc_in"](self.ln_2b(x))))
        return x + self._attn(self.attn2, self.ln_2a(x)) + mlp2


class EinsumAttention(nn.Module):
    """Attention written with einsum, an additive bias on the scores."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(W), nn.LayerNorm(W)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(W, W, bias=False) for _ in range(4))
        self.w1, self.w2 = nn.Linear(W, 64), nn.Linear(64, W)

    def forward(self, x, bias):
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, H, HD) for p in (self.wq, self.wk, self.wv))
        scores = torch.einsum("bthd,bshd->bhts", q, k) * HD ** -0.5 + bias
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, W)
        x = x + self.wo(out)
        return x + self.w2(F.relu(self.w1(self.norm2(x))))


class BaddbmmAttention(nn.Module):
    """Attention on (batch·heads) with baddbmm + bmm, as nn.MultiheadAttention's slow path writes it."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(W)
        self.query, self.key, self.value, self.dense = (nn.Linear(W, W) for _ in range(4))

    def forward(self, x, bias):
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, t, H, HD).transpose(1, 2).reshape(b * H, t, HD)
                   for p in (self.query, self.key, self.value))
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=HD ** -0.5)
        out = torch.bmm(scores.softmax(-1), v).view(b, H, t, HD).transpose(1, 2).reshape(b, t, W)
        return x + self.dense(out)


class GroupedQuery(nn.Module):
    """GQA by repeat_interleave (block 0) and MQA by expand (block 1), both through SDPA."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(W) for _ in range(4))
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(W, W), "k_proj": nn.Linear(W, kv * HD),
                                                   "v_proj": nn.Linear(W, kv * HD), "o_proj": nn.Linear(W, W),
                                                   "mlp": SwiGLU()}) for kv in (2, 1))

    def forward(self, x):
        for i, p in enumerate(self.layers):
            h = self.norms[2 * i](x)
            kvh = p["k_proj"].out_features // HD
            q, k, v = _heads(p["q_proj"](h)), _heads(p["k_proj"](h), kvh), _heads(p["v_proj"](h), kvh)
            if i == 0:
                k, v = k.repeat_interleave(H // kvh, dim=1), v.repeat_interleave(H // kvh, dim=1)
            else:
                k, v = k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1)
            x = x + p["o_proj"](_merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
            x = x + p["mlp"](self.norms[2 * i + 1](x))
        return x


class FusedQKV(nn.Module):
    """One qkv linear split by chunk (block 0) and by view + permute + unbind (block 1, ViT style)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm1": nn.LayerNorm(W), "qkv": nn.Linear(W, 3 * W),
                                                   "proj": nn.Linear(W, W), "norm2": nn.LayerNorm(W),
                                                   "fc1": nn.Linear(W, 64), "fc2": nn.Linear(64, W)})
                                    for _ in range(2))

    def forward(self, x):
        b, t, _ = x.shape
        for i, p in enumerate(self.blocks):
            qkv = p["qkv"](p["norm1"](x))
            if i == 0:
                q, k, v = (_heads(z) for z in qkv.chunk(3, dim=-1))
            else:
                q, k, v = qkv.reshape(b, t, 3, H, HD).permute(2, 0, 3, 1, 4).unbind(0)
            x = x + p["proj"](_merge(F.scaled_dot_product_attention(q, k, v)))
            x = x + p["fc2"](F.gelu(p["fc1"](p["norm2"](x))))
        return x


class QKNormRope(nn.Module):
    """q/k LayerNorm per head, then rotate-half RoPE, explicit softmax in float32."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(W), nn.RMSNorm(W)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(W, W, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = nn.LayerNorm(HD), nn.LayerNorm(HD)
        self.mlp = SwiGLU()

    def forward(self, x):
        t = x.shape[1]
        h = self.norm1(x)
        q = apply_rope(self.q_norm(_heads(self.q_proj(h))), t)
        k = apply_rope(self.k_norm(_heads(self.k_proj(h))), t)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * HD ** -0.5, dim=-1).type_as(q)
        x = x + self.o_proj(_merge(probs @ _heads(self.v_proj(h))))
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    """Self-attention on x, then cross-attention: q from x, k/v from a context of another length and width."""

    def __init__(self, ctx_width=24):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(W), nn.LayerNorm(W), nn.LayerNorm(W)
        self.attn1 = nn.ModuleDict({n: nn.Linear(W, W) for n in ("to_q", "to_k", "to_v", "to_out")})
        self.attn2 = nn.ModuleDict({"to_q": nn.Linear(W, W), "to_k": nn.Linear(ctx_width, W),
                                    "to_v": nn.Linear(ctx_width, W), "to_out": nn.Linear(W, W)})
        self.ff = nn.ModuleDict({"proj": nn.Linear(W, 128), "out": nn.Linear(64, W)})

    @staticmethod
    def _attend(p, h, ctx):
        q, k, v = _heads(p["to_q"](h)), _heads(p["to_k"](ctx)), _heads(p["to_v"](ctx))
        return p["to_out"](_merge(F.scaled_dot_product_attention(q, k, v)))

    def forward(self, x, context):
        h = self.norm1(x)
        x = x + self._attend(self.attn1, h, h)
        x = x + self._attend(self.attn2, self.norm2(x), context)
        a, gate = self.ff["proj"](self.norm3(x)).chunk(2, dim=-1)  # GeGLU: one fused up projection
        return x + self.ff["out"](a * F.gelu(gate))


class AdaLNBlock(nn.Module):
    """DiT: timestep MLP, adaLN-Zero modulation (shift/scale/gate from one linear), GELU-tanh MLP as Sequential."""

    def __init__(self):
        super().__init__()
        self.t_embedder = nn.Sequential(nn.Linear(16, W), nn.SiLU(), nn.Linear(W, W))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(W, 6 * W))
        self.norm1 = nn.LayerNorm(W, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(W, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(W, 3 * W), nn.Linear(W, W)
        self.mlp = nn.Sequential(nn.Linear(W, 64), nn.GELU(approximate="tanh"), nn.Linear(64, W))

    def forward(self, x, t_freq):
        c = self.t_embedder(t_freq)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = (_heads(z) for z in self.qkv(h).split(W, dim=-1))
        x = x + gate1 * self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class AdaRMSBlock(nn.Module):
    """pi0.5's action expert layer: adaRMS norms whose scale/shift/gate come from a `dense` linear on the time
    embedding, SDPA with GQA, gated residuals."""

    def __init__(self):
        super().__init__()
        self.input_norm = nn.ModuleDict({"dense": nn.Linear(W, 3 * W)})
        self.post_norm = nn.ModuleDict({"dense": nn.Linear(W, 3 * W)})
        self.q_proj, self.o_proj = nn.Linear(W, W, bias=False), nn.Linear(W, W, bias=False)
        self.k_proj, self.v_proj = nn.Linear(W, HD, bias=False), nn.Linear(W, HD, bias=False)
        self.mlp = SwiGLU()

    @staticmethod
    def _ada_rms(x, norm, cond):
        scale, shift, gate = norm["dense"](cond)[:, None].chunk(3, dim=-1)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed * (1 + scale) + shift, gate

    def forward(self, x, cond):
        h, gate = self._ada_rms(x, self.input_norm, cond)
        q, k, v = _heads(self.q_proj(h)), _heads(self.k_proj(h), 1), _heads(self.v_proj(h), 1)
        x = x + gate * self.o_proj(_merge(F.scaled_dot_product_attention(q, k, v, enable_gqa=True)))
        h, gate = self._ada_rms(x, self.post_norm, cond)
        return x + gate * self.mlp(h)


class GLUVariants(nn.Module):
    """Llama-1 names (w1 gate, w3 up, w2 down) with SwiGLU, then GeGLU with separate gate/up, then a ReLU² MLP."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(W) for _ in range(3))
        self.swiglu = nn.ModuleDict({"w1": nn.Linear(W, 64), "w2": nn.Linear(64, W), "w3": nn.Linear(W, 64)})
        self.geglu = nn.ModuleDict({"wi_0": nn.Linear(W, 64), "wi_1": nn.Linear(W, 64), "wo": nn.Linear(64, W)})
        self.relu2 = nn.ModuleDict({"c_fc": nn.Linear(W, 64), "c_proj": nn.Linear(64, W)})

    def forward(self, x):
        s, g, r = self.swiglu, self.geglu, self.relu2
        h = self.norms[0](x)
        x = x + s["w2"](F.silu(s["w1"](h)) * s["w3"](h))
        h = self.norms[1](x)
        x = x + g["wo"](F.gelu(g["wi_0"](h), approximate="tanh") * g["wi_1"](h))
        return x + r["c_proj"](F.relu(r["c_fc"](self.norms[2](x))).square())


class RoutedExperts(nn.Module):
    """MoE: a router linear, softmax + top-k, expert SwiGLUs weighted by their (scattered) routing weights."""

    def __init__(self, experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.norm = nn.RMSNorm(W)
        self.router = nn.Linear(W, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden=32) for _ in range(experts))

    def forward(self, x):
        h = self.norm(x)
        probs = self.router(h).softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, chosen, weights / weights.sum(-1, keepdim=True))
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            out = out + gates[..., e:e + 1] * expert(h)
        return x + out


class TiedWeights(nn.Module):
    """Token embedding tied to the LM head, and one block applied twice (ALBERT-style layer sharing)."""

    def __init__(self, vocab=50):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, W)
        self.layer = QKNormRope()
        self.final_norm = nn.RMSNorm(W)
        self.lm_head = nn.Linear(W, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        x = self.layer(self.layer(x))
        return self.lm_head(self.final_norm(x))


class TorchMHA(nn.Module):
    """nn.MultiheadAttention (packed in_proj_weight, out_proj) with and without returned weights."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(W), nn.LayerNorm(W), nn.LayerNorm(W)
        self.attn = nn.MultiheadAttention(W, H, batch_first=True)
        self.attn_w = nn.MultiheadAttention(W, H, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(W, 64), nn.GELU(), nn.Linear(64, W))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.ln2(x)
        x = x + self.attn_w(h, h, h)[0]
        return x + self.mlp(self.ln3(x))


class DiTStep(nn.Module):
    """A GR00T-like denoise step with plain argument names: action encoder, timestep MLP, self- and
    cross-attention blocks on prefix features, action decoder."""

    def __init__(self, action_dim=7, feat=48):
        super().__init__()
        self.action_in = nn.Linear(action_dim, W)
        self.time_mlp = nn.Sequential(nn.Linear(16, W), nn.SiLU(), nn.Linear(W, W))
        self.blocks = nn.ModuleList(CrossAttention(ctx_width=feat) for _ in range(2))
        self.norm_out = nn.LayerNorm(W)
        self.action_out = nn.Linear(W, action_dim)

    def forward(self, x_t, timestep, encoder_hidden_states):
        half = torch.arange(8, dtype=torch.float32) / 8
        t_freq = torch.cat([torch.sin(timestep[:, None] * half), torch.cos(timestep[:, None] * half)], dim=-1)
        x = self.action_in(x_t) + self.time_mlp(t_freq)[:, None]
        for blk in self.blocks:
            x = blk(x, encoder_hidden_states)
        return self.action_out(self.norm_out(x))



class Conv1D(nn.Module):
    """GPT-2's (transformers.pytorch_utils.Conv1D) linear: weight [in, out], y = addmm(b, x, W)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class GPT2Block(nn.Module):
    """GPT-2 block: Conv1D fused c_attn split in q/k/v, causal attention, c_proj; Conv1D MLP with GELU; and an extra
    head read as `x @ self.proj.t()` (a raw parameter, no module)."""

    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(W), nn.LayerNorm(W)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = Conv1D(3 * W, W), Conv1D(W, W)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = Conv1D(4 * W, W), Conv1D(W, 4 * W)
        self.proj = nn.Parameter(torch.randn(W, W) / math.sqrt(W))

    def forward(self, x):
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(W, dim=-1)
        q, k, v = (t.view(*x.shape[:-1], H, W // H).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        x = x + self.attn.c_proj(a)
        x = x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))
        return x @ self.proj.t()


class StateValueHead(nn.Module):
    """A robot-state encoder on one token (an MLP on [B, 1, S], as GR00T's) prepended to the sequence, a residual MLP,
    and a one-output value head on the first token: at batch 1 their GEMMs have one row, the head's one column."""

    def __init__(self, state_dim=7):
        super().__init__()
        self.state_encoder = nn.Sequential(nn.Linear(state_dim, W), nn.ReLU(), nn.Linear(W, W))
        self.fc_in, self.fc_out, self.value = nn.Linear(W, 4 * W), nn.Linear(4 * W, W), nn.Linear(W, 1)

    def forward(self, x, state):
        h = torch.cat([self.state_encoder(state.unsqueeze(1)), x], dim=1)
        h = h + self.fc_out(F.gelu(self.fc_in(h)))
        return self.value(h[:, :1])


class EinsumProjections(nn.Module):
    """A JAX port (big_vision / Gemma style): every projection an einsum with a raw parameter — q [N, D, H], fused
    k/v [2, K, D, H] unbound after the product, the output [N, H, D] contracting two letters, a fused gate/up
    [2, D, F] — and the down projection written with an ellipsis."""

    def __init__(self, hidden=64):
        super().__init__()
        self.norm = nn.RMSNorm(W)
        self.q_einsum = nn.Parameter(torch.randn(H, W, HD) / math.sqrt(W))
        self.kv_einsum = nn.Parameter(torch.randn(2, H, W, HD) / math.sqrt(W))
        self.attn_vec_einsum = nn.Parameter(torch.randn(H, HD, W) / math.sqrt(W))
        self.gating_einsum = nn.Parameter(torch.randn(2, W, hidden) / math.sqrt(W))
        self.linear = nn.Parameter(torch.randn(hidden, W) / math.sqrt(hidden))

    def forward(self, x):
        h = self.norm(x)
        q = torch.einsum("BTD,NDH->BTNH", h, self.q_einsum)
        k, v = torch.einsum("BSD,CKDH->CBSKH", h, self.kv_einsum)
        probs = (torch.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(HD)).softmax(-1)
        x = x + torch.einsum("BTNH,NHD->BTD", torch.einsum("BNTS,BSNH->BTNH", probs, v), self.attn_vec_einsum)
        gate, up = torch.einsum("BTD,CDF->CBTF", self.norm(x), self.gating_einsum)
        return x + torch.einsum("...F,FD->...D", F.gelu(gate) * up, self.linear)


class AutocastBlock(nn.Module):
    """A block that runs under bf16 autocast inside forward (GR00T's sampling, most mixed-precision ports), with an
    fp32 residual stream and an fp32 softmax forced inside the block."""

    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(W), nn.LayerNorm(W)
        self.q_proj, self.k_proj = nn.Linear(W, W, bias=False), nn.Linear(W, W, bias=False)
        self.v_proj, self.o_proj = nn.Linear(W, W, bias=False), nn.Linear(W, W, bias=False)
        self.mlp = SwiGLU()

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.input_layernorm(x)
            q, k, v = (_heads(p(h)) for p in (self.q_proj, self.k_proj, self.v_proj))
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(HD), dim=-1)
            x = x + self.o_proj(_merge(probs.to(v.dtype) @ v)).float()
            y = self.mlp(self.post_attention_layernorm(x))
        return x + y.float()


def _relative_bias(score, b, h, q_idx, kv_idx):
    return score - 0.1 * (q_idx - kv_idx).abs()


class FlexAttentionExpert(nn.Module):
    """An action-expert block on torch's flex_attention with a relative-position score_mod (a subgraph in the export)
    and a time-conditioned MLP."""

    def __init__(self):
        super().__init__()
        self.time_proj = nn.Linear(W, W)
        self.q_proj, self.k_proj = nn.Linear(W, W, bias=False), nn.Linear(W, W, bias=False)
        self.v_proj, self.o_proj = nn.Linear(W, W, bias=False), nn.Linear(W, W, bias=False)
        self.norm, self.mlp = nn.RMSNorm(W), SwiGLU()

    def forward(self, x, cond):
        from torch.nn.attention.flex_attention import flex_attention

        x = x + self.time_proj(F.silu(cond))[:, None]
        h = self.norm(x)
        q, k, v = (_heads(p(h)) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.o_proj(_merge(flex_attention(q, k, v, score_mod=_relative_bias)))
        return x + self.mlp(self.norm(x))


class StackedExperts(nn.Module):
    """GPT-OSS's experts as it runs them without grouped GEMMs: every expert on every token, each projection one
    parameter stacked per expert [E, in, out] applied with bmm (gate/up interleaved, biases), the router's top-k
    weights scattered to a dense [tokens, E] and zero for the other experts."""

    def __init__(self, experts=4, hidden=48, top_k=2):
        super().__init__()
        self.experts, self.top_k = experts, top_k
        self.norm, self.router = nn.RMSNorm(W), nn.Linear(W, experts)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, W, 2 * hidden) / math.sqrt(W))
        self.gate_up_proj_bias = nn.Parameter(torch.randn(experts, 2 * hidden) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, W) / math.sqrt(hidden))
        self.down_proj_bias = nn.Parameter(torch.randn(experts, W) * 0.02)

    def forward(self, x):
        h = self.norm(x).reshape(-1, W)
        logits = self.router(h)
        top, index = logits.topk(self.top_k, dim=-1)
        routing = torch.zeros_like(logits).scatter(1, index, top.softmax(-1))
        states = h.repeat(self.experts, 1).view(self.experts, -1, W)
        gate_up = torch.bmm(states, self.gate_up_proj) + self.gate_up_proj_bias[..., None, :]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        act = (up + 1) * (gate * torch.sigmoid(gate * 1.702))
        out = torch.bmm(act, self.down_proj) + self.down_proj_bias[..., None, :]
        return x + (out * routing.T[..., None]).sum(0).view(x.shape)


def _sdpa(q, k, v):
    return _merge(F.scaled_dot_product_attention(_heads(q), _heads(k), _heads(v)))


class FusedKVCrossAttention(nn.Module):
    """Cross-attention with K and V from one linear (Perceiver / DiT `to_kv`), then nn.MultiheadAttention with query ≠
    key, whose packed in_proj folds into a q slice and one k|v slice: role attn_kv (both were attn_v)."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_kv, self.to_out = nn.Linear(W, W), nn.Linear(W, 2 * W), nn.Linear(W, W)
        self.mha = nn.MultiheadAttention(W, H, batch_first=True)

    def forward(self, x, context):
        k, v = self.to_kv(context).chunk(2, dim=-1)
        x = x + self.to_out(_sdpa(self.to_q(x), k, v))
        return x + self.mha(x, context, context, need_weights=False)[0]


class SharedQueryHead(nn.Module):
    """Wan I2V / IP-Adapter cross-attention in an action head: one query, two K/V sets (text, image), the two outputs
    summed before one output projection; then an MLP. The image K/V were backbone (quantized inside the head's
    attention) and the output projection `other`."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(W, W) for _ in range(4))
        self.add_k_proj, self.add_v_proj = nn.Linear(W, W), nn.Linear(W, W)
        self.norm, self.mlp = nn.LayerNorm(W), SwiGLU()

    def forward(self, x_t, text, image):
        q = self.to_q(x_t)
        x = x_t + self.to_out(_sdpa(q, self.to_k(text), self.to_v(text)) +
                              _sdpa(q, self.add_k_proj(image), self.add_v_proj(image)))
        return x + self.mlp(self.norm(x))


class SingleStreamBlock(nn.Module):
    """Flux's single-stream block: attention and an MLP side by side over one AdaLN-modulated input, one output
    projection over both, `proj_out(cat([attn, gelu(proj_mlp(x))]))`, gated back onto the stream. proj_mlp was
    `other`; proj_out an attention site whose OHB β would scale the MLP half too."""

    def __init__(self):
        super().__init__()
        self.norm, self.modulation = nn.LayerNorm(W, elementwise_affine=False), nn.Linear(W, 3 * W)
        self.to_q, self.to_k, self.to_v = (nn.Linear(W, W) for _ in range(3))
        self.proj_mlp, self.proj_out = nn.Linear(W, 4 * W), nn.Linear(5 * W, W)

    def forward(self, x_t, t_emb):
        shift, scale, gate = self.modulation(F.silu(t_emb))[:, None].chunk(3, dim=-1)
        h = self.norm(x_t) * (1 + scale) + shift
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return x_t + gate * self.proj_out(torch.cat([_sdpa(self.to_q(h), self.to_k(h), self.to_v(h)), mlp], dim=2))


class MaskedCrossAttention(nn.Module):
    """lerobot evo1's action head: cross-attention over a padded prefix whose padding is masked with -inf before the
    softmax (masked_fill; nn.MultiheadAttention's key_padding_mask does the same). ATM's logit statistics were NaN
    there (-inf·0), and the folded α made the whole program NaN."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(W, W) for _ in range(4))
        self.norm, self.mlp = nn.LayerNorm(W), SwiGLU()

    def forward(self, x_t, prefix, prefix_mask):
        scores = _heads(self.q_proj(x_t)) @ _heads(self.k_proj(prefix)).transpose(-1, -2) / math.sqrt(W // H)
        scores = scores.masked_fill(~prefix_mask[:, None, None, :], float("-inf"))
        x = x_t + self.o_proj(_merge(scores.softmax(-1) @ _heads(self.v_proj(prefix))))
        return x + self.mlp(self.norm(x))
