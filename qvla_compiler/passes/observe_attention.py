"""Insert (and later remove) the ATM/OHB observers: per-head logit std and per-layer o_proj output RMS.

Before: q → SDPA(q, k, v, mask)            or  scores → softmax(scores) → P·V
        z = o_proj(a) → (gate) → residual add
After:  q → logit_obs(q, k, mask) → SDPA(…)  or  scores → logit_obs(scores) → softmax
        z = o_proj(a) → energy_obs(z) → …
Every observer is an identity call_module node, so the program computes exactly what it did; the op schedule is
unchanged once `remove_attention_observers` has run. Works on float and on lowered graphs (sites come from the
LinearInfo annotations, which lowering keeps).
Statistics: logits q·kᵀ·scale per (batch, head) over valid entries (mask True / additive ≥ −1e4 / causal), population
std, mean over batch, then mean over calls (every denoising step of every sample); RMS = sqrt(mean(z²)) over the whole
output per call, mean over calls (the GR00T reference code's aggregation).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch import nn

from qvla_compiler.meta import Region
from qvla_compiler.passes.insert_observers import remove_observers
from qvla_compiler.passes._attention_sites import attention_sites, sdpa_arguments, softmax_of

ATTN_OBSERVER_PREFIX = "qvla_attnobs_"
_MASKED_BELOW = -1e4  # additive masks and masked_fill(finfo.min) both land far below this


class LogitObserver(nn.Module):
    """Identity on its first argument. Called either with the pre-softmax scores, or with (q, k, mask) of an SDPA."""

    def __init__(self):
        super().__init__()
        self.std_sum: torch.Tensor | None = None
        self.calls = 0

    def forward(self, x, k=None, mask=None, is_causal: bool = False, scale: float | None = None):
        with torch.no_grad():
            scores = x.detach().double() if k is None else _sdpa_scores(x, k, scale)
            valid = scores > _MASKED_BELOW
            if mask is not None:
                valid = valid & (mask if mask.dtype == torch.bool else mask > _MASKED_BELOW)
            if is_causal:
                valid = valid & torch.ones(scores.shape[-2:], dtype=torch.bool, device=x.device).tril()
            self._record(scores, valid.expand_as(scores))
        return x

    def _record(self, scores: torch.Tensor, valid: torch.Tensor) -> None:
        keep = valid.flatten(2)  # [B, H, Tq*Tk]
        flat = torch.where(keep, scores.flatten(2), 0.0)  # masked logits may be -inf, and -inf·0 would be NaN
        n = keep.sum(-1).clamp_min(1)
        mean = flat.sum(-1) / n
        std = (torch.where(keep, flat - mean[..., None], 0.0).pow(2).sum(-1) / n).sqrt()  # population std per (b, h)
        per_head = std.mean(0)
        self.std_sum = per_head if self.std_sum is None else self.std_sum + per_head
        self.calls += 1

    def std(self) -> list[float] | None:
        return None if self.calls == 0 else (self.std_sum / self.calls).tolist()


def _sdpa_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    q, k = q.detach().double(), k.detach().double()
    if k.shape[-3] != q.shape[-3]:  # GQA/MQA through enable_gqa: each KV head serves consecutive query heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    return q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)


class EnergyObserver(nn.Module):
    """Identity; records the RMS of the tensor it sees (the o_proj output before the residual add)."""

    def __init__(self):
        super().__init__()
        self.rms_sum = 0.0
        self.calls = 0

    def forward(self, z):
        if z.numel():
            self.rms_sum += float(z.detach().double().pow(2).mean().add(1e-12).sqrt())
            self.calls += 1
        return z

    def rms(self) -> float | None:
        return None if self.calls == 0 else self.rms_sum / self.calls


@dataclasses.dataclass(frozen=True)
class BlockStats:
    """One attention layer's calibration statistics (None where the observer saw nothing)."""

    logit_std: list[float] | None
    energy_rms: float | None


def observe_attention(gm: fx.GraphModule,
                      regions: tuple[Region, ...] | None = (Region.ACTION_HEAD,)) -> fx.GraphModule:
    """Insert a logit observer per core and an energy observer per o_proj output, for cores in `regions`."""
    for site in attention_sites(gm, regions):
        _insert_logit_observer(gm, site)
        for o in site.o_linears:
            _insert_after(gm, o, f"{ATTN_OBSERVER_PREFIX}{site.block}_energy_{o.name}", EnergyObserver())
    gm.graph.lint()
    gm.recompile()
    return gm


def _insert_logit_observer(gm: fx.GraphModule, site) -> bool:
    name = f"{ATTN_OBSERVER_PREFIX}{site.block}_logits"
    if site.is_sdpa:
        sdpa = site.sdpa_node
        a = sdpa_arguments(sdpa)
        gm.add_submodule(name, LogitObserver())
        with gm.graph.inserting_before(sdpa):
            obs = gm.graph.call_module(name, (a["query"], a["key"], a["attn_mask"]),
                                       {"is_causal": a["is_causal"], "scale": a["scale"]})
        obs.meta["val"] = a["query"].meta.get("val")
        sdpa.replace_input_with(a["query"], obs)
        return True
    softmax = softmax_of(site)
    if softmax is None:
        return False
    scores = softmax.args[0]
    _insert_after(gm, scores, name, LogitObserver(), only=softmax)
    return True


def _insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module, only: fx.Node | None = None):
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        obs = gm.graph.call_module(name, (node,))
    obs.meta["val"] = node.meta.get("val")
    if only is not None:
        only.replace_input_with(node, obs)
    else:
        node.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)


def attention_stats(gm: fx.GraphModule) -> dict[int, BlockStats]:
    """{block: BlockStats} from the observers currently in `gm`."""
    stds: dict[int, list[float] | None] = {}
    rms: dict[int, list[float]] = {}
    for name, module in gm.named_children():
        if not name.startswith(ATTN_OBSERVER_PREFIX):
            continue
        block = int(name[len(ATTN_OBSERVER_PREFIX):].split("_")[0])
        if isinstance(module, LogitObserver):
            stds[block] = module.std()
        elif isinstance(module, EnergyObserver) and module.rms() is not None:
            rms.setdefault(block, []).append(module.rms())
    blocks = sorted(set(stds) | set(rms))
    return {b: BlockStats(stds.get(b), sum(rms[b]) / len(rms[b]) if b in rms else None) for b in blocks}


def remove_attention_observers(gm: fx.GraphModule) -> fx.GraphModule:
    """Bypass and delete every ATM/OHB observer node and module."""
    return remove_observers(gm, ATTN_OBSERVER_PREFIX)
