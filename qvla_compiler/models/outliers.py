"""Outlier injection: a function-preserving reparameterisation that gives a policy LLM-like activation outliers.

Random weights give well-spread activations, so rotations and smoothing have nothing to fix. Real VLAs have a few
channels 20–100× larger than the rest at the norm outputs and at the MLP down-projection input. This module puts them
there without changing what the policy computes:

* norm → consumers: channel j of the norm's output is multiplied by s_j (RMSNorm gain w_j ← s_j·w_j, Gemma's
  1 + w_j ← s_j·(1 + w_j), adaRMS / AdaLN: the modulation linear's scale and shift rows, so 1 + scale_j and shift_j
  are multiplied by s_j), and column j of every consumer's weight is divided by s_j.
* gated MLP: row j of up_proj ← s_j·row j (h_j = act(g_j)·u_j scales with u_j), column j of down_proj ← /s_j.
  (Non-gated GELU MLPs are left alone: GELU is not homogeneous.)

Exact in real arithmetic; in fp32 the actions move by ~1e-7 relative.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qvla_compiler.models.common import RMSNorm


def inject_outliers(policy: nn.Module, channels: int = 4, scale: tuple[float, float] = (20.0, 100.0),
                    seed: int = 0) -> nn.Module:
    """Give `channels` channels of every norm output and gated-MLP hidden a gain drawn from `scale`, in place.

    Example::

        policy = inject_outliers(build_policy("pi05-tiny"))   # same actions, much harder to quantize
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in policy.modules():
            for norm_name, consumers in _norm_consumers(module):
                norm = getattr(module, norm_name)
                ch, s = _draw(gen, _width(norm), channels, scale)
                _scale_norm(norm, ch, s)
                for lin in consumers:
                    lin.weight[:, ch] /= s
            if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
                ch, s = _draw(gen, module.up_proj.out_features, channels, scale)
                module.up_proj.weight[ch] *= s[:, None]
                if module.up_proj.bias is not None:
                    module.up_proj.bias[ch] *= s
                module.down_proj.weight[:, ch] /= s
    return policy


def _norm_consumers(module: nn.Module) -> list[tuple[str, list[nn.Linear]]]:
    """(norm attribute, linears reading only its output) for the decoder layers of the reference policies."""
    found = []
    attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    if hasattr(module, "input_layernorm") and attn is not None and hasattr(attn, "q_proj"):
        found.append(("input_layernorm", [attn.q_proj, attn.k_proj, attn.v_proj]))
    if hasattr(module, "post_attention_layernorm") and mlp is not None and hasattr(mlp, "gate_proj"):
        found.append(("post_attention_layernorm", [mlp.gate_proj, mlp.up_proj]))
    attn1 = getattr(module, "attn1", None)
    if hasattr(module, "norm1") and attn1 is not None:  # GR00T DiT: self-attending blocks read the norm for k, v too
        found.append(("norm1", [attn1.to_q] if module.cross else [attn1.to_q, attn1.to_k, attn1.to_v]))
    return found


def _width(norm: nn.Module) -> int:
    if isinstance(norm, RMSNorm):
        return norm.weight.numel()
    linear = getattr(norm, "dense", None) or getattr(norm, "linear")
    return linear.in_features


def _draw(gen: torch.Generator, width: int, channels: int, scale: tuple[float, float]) -> tuple[Tensor, Tensor]:
    ch = torch.randperm(width, generator=gen)[: min(channels, width)]
    lo, hi = scale
    return ch, lo + (hi - lo) * torch.rand(ch.numel(), generator=gen)


def _scale_norm(norm: nn.Module, ch: Tensor, s: Tensor) -> None:
    if isinstance(norm, RMSNorm):
        w = norm.weight
        w[ch] = s * (1 + w[ch]) - 1 if norm.unit_offset else s * w[ch]
        return
    linear = getattr(norm, "dense", None) or getattr(norm, "linear")  # adaRMS (scale, shift, gate), AdaLN (scale, shift)
    width = linear.out_features // (3 if hasattr(norm, "dense") else 2)
    scale_rows, shift_rows = ch, ch + width
    linear.weight[scale_rows] *= s[:, None]
    linear.bias[scale_rows] = s * (1 + linear.bias[scale_rows]) - 1  # 1 + scale_j ↦ s_j·(1 + scale_j)
    linear.weight[shift_rows] *= s[:, None]
    linear.bias[shift_rows] *= s
