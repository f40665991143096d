"""Small modules with the structures the passes must recognise: explicit and SDPA attention, RoPE, q/k-norm,
GQA, KV concatenation, cross-attention, a fused QKV projection, gated MLPs and non-MLP linear stacks."""
import math

import torch
import torch.nn.functional as F
from torch import nn


def rope(x, pos):
    d = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(d, dtype=torch.float32) / d))
    ang = pos[..., None].float() * freq
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block. `sdpa` picks the attention form; `fused` uses one qkv linear."""

    def __init__(self, width=32, heads=4, kv_heads=2, mlp=64, sdpa=False, fused=False, qk_norm=False):
        super().__init__()
        self.h, self.kvh, self.hd = heads, kv_heads, width // heads
        self.sdpa, self.fused, self.qk_norm = sdpa, fused, qk_norm
        self.norm1 = nn.RMSNorm(width)
        if fused:
            self.qkv_proj = nn.Linear(width, (heads + 2 * kv_heads) * self.hd)
        else:
            self.q_proj = nn.Linear(width, heads * self.hd)
            self.k_proj = nn.Linear(width, kv_heads * self.hd)
            self.v_proj = nn.Linear(width, kv_heads * self.hd)
        self.q_norm, self.k_norm = nn.RMSNorm(self.hd), nn.RMSNorm(self.hd)
        self.o_proj = nn.Linear(heads * self.hd, width)
        self.norm2 = nn.RMSNorm(width)
        self.gate_proj, self.up_proj = nn.Linear(width, mlp), nn.Linear(width, mlp)
        self.down_proj = nn.Linear(mlp, width)

    def qkv(self, x):
        b, t, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.h, self.hd)
        k = k.view(b, t, self.kvh, self.hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        pos = torch.arange(t).expand(b, t)
        q, k = rope(q.transpose(1, 2), pos), rope(k.transpose(1, 2), pos)
        return q, k, v.view(b, t, self.kvh, self.hd).transpose(1, 2)

    def attend(self, q, k, v):
        rep = self.h // self.kvh
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        return torch.softmax(scores.float(), -1).to(q.dtype) @ v

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x))
        x = x + self.o_proj(self.attend(q, k, v).transpose(1, 2).reshape(b, t, -1))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ToyPolicyNet(nn.Module):
    """An embedding MLP (not an MLP block: no residual), two blocks of different forms, a head."""

    def __init__(self, width=32, **block_kw):
        super().__init__()
        self.embed_in, self.embed_out = nn.Linear(8, width), nn.Linear(width, width)
        self.blocks = nn.ModuleList([Block(width, **{"sdpa": False, **block_kw}),
                                     Block(width, **{**block_kw, "sdpa": True, "qk_norm": True})])
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.embed_out(F.silu(self.embed_in(x)))
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


TOY_ROLES = {"embed_in": "other", "embed_out": "other", "head": "other", "q_proj": "attn_q", "k_proj": "attn_k",
             "v_proj": "attn_v", "o_proj": "attn_o", "qkv_proj": "attn_qkv", "gate_proj": "mlp", "up_proj": "mlp",
             "down_proj": "mlp"}


def rotate_toy(model: nn.Module, batches: list, recipe):
    """Capture `model`, run phases 1, 2 and 2b of the pipeline with `recipe`, take the observers out.

    Returns (graph module, compute schedule and code before phase 2b) for the rotation / smoothing tests.
    """
    from qvla_compiler.calibration import run_calibration as calibrate
    from qvla_compiler.export import capture_module
    from qvla_compiler.passes import apply_layout, assign_regions, classify_linears, insert_observers, remove_observers
    from qvla_compiler.passes.check_schedule import compute_schedule
    from qvla_compiler.passes.rotate_and_smooth import fit_transforms, rotate_and_smooth
    from qvla_compiler.program import Program

    program = Program(capture_module(model, batches[0]))
    gm = program.graphs["forward"]
    before, code = compute_schedule(gm), gm.code
    classify_linears(gm)
    assign_regions(gm)
    apply_layout(gm, recipe)
    insert_observers(gm)
    calibrate(program, batches, progress=False)
    fit_transforms([gm], recipe)
    rotate_and_smooth(gm, recipe)
    remove_observers(gm)
    return gm, before, code
