"""Attention Temperature Matching (ATM) and Output Head Balancing (OHB): calibration math and orchestration.

ATM: α_h = σ_T,h / (σ_S,h + 1e-6) per action-head attention head (σ = std of the pre-softmax logits), clipped to
[lo, hi] and snapped to 1 inside a neutral band; it multiplies that head's queries. OHB: β_l = RMS_T / (RMS_S + 1e-6)
per action-head attention layer (RMS of the o_proj output before the residual add), clipped in log space and snapped
to 1 inside a neutral band; it multiplies o_proj's output. The teacher is the float program, the student the lowered
one, on the same calibration inputs and noise; α and β come from one student pass (so β does not see α), then both
are folded into existing tensors by `fold_attention_scales`: the lowered graphs gain no op.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch.fx as fx

from qvla_compiler.errors import ScheduleError
from qvla_compiler.meta import Region
from qvla_compiler.passes import assign_regions, classify_linears
from qvla_compiler.passes._attention_sites import attention_sites
from qvla_compiler.passes.fold_attention_scales import alpha_target, fold_attention_scales
from qvla_compiler.passes.observe_attention import (BlockStats, attention_stats, observe_attention,
                                                     remove_attention_observers)
from qvla_compiler.program import Program

SCOPE = (Region.ACTION_HEAD,)  # the paper applies both only in the DiT / action expert
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class AtmStyle:
    """Clip range and neutral band of α. `inclusive`: |α − 1| ≤ neutral snaps (π0.5 code) or < neutral (GR00T)."""

    lo: float
    hi: float
    neutral: float
    inclusive: bool


ATM_STYLES = {
    "pi05": AtmStyle(0.8, 1.25, 0.05, inclusive=True),  # openpi_duquant calibrate_atm_dit: isclose(α, 1, atol=0.05)
    "groot": AtmStyle(0.7, 1.4, 0.02, inclusive=False),  # QuantVLA_GR00T dit_atm: |α − 1| < 0.02
}


def atm_alpha(teacher_std: list[float], student_std: list[float], style: AtmStyle) -> list[float]:
    """Per-head α: ratio, clip, neutral band."""
    out = []
    for t, s in zip(teacher_std, student_std):
        a = 1.0 if s <= 0 else min(max(t / (s + EPS), style.lo), style.hi)
        near = abs(a - 1.0) <= style.neutral if style.inclusive else abs(a - 1.0) < style.neutral
        out.append(1.0 if near else a)
    return out


def ohb_beta(teacher_rms: float, student_rms: float, log_clip: float = 0.3, neutral: float = 0.03) -> float:
    """Per-layer β: log ratio clipped to ±log_clip, 1 when |log β| < neutral."""
    if student_rms <= 0 or teacher_rms <= 0:
        return 1.0
    log_b = min(max(math.log(teacher_rms / (student_rms + EPS)), -log_clip), log_clip)
    return 1.0 if abs(log_b) < neutral else math.exp(log_b)


def resolve_style(recipe, policy=None) -> AtmStyle:
    """The recipe's ATM style ("auto": GR00T-style for GR00T policies, π0.5-style otherwise) with its overrides."""
    name = recipe.atm_style
    if name == "auto":
        from qvla_compiler.models.groot import GrootPolicy
        name = "groot" if isinstance(policy, GrootPolicy) else "pi05"
    style = ATM_STYLES[name]
    lo, hi = recipe.atm_clip if recipe.atm_clip is not None else (style.lo, style.hi)
    neutral = recipe.atm_neutral if recipe.atm_neutral is not None else style.neutral
    return AtmStyle(lo, hi, neutral, style.inclusive)


def collect_batches(calib: Iterable[Any] | Callable) -> list:
    """Materialise calibration inputs once, so teacher, quantizer calibration and student see the very same ones."""
    if callable(calib):
        batches: list = []
        calib(batches.append)
        return batches
    return list(calib)


def observe_program(program: Program, batches: list, regions: tuple[Region, ...] | None = SCOPE
                    ) -> dict[str, dict[int, BlockStats]]:
    """Run `batches` through `program` with attention observers in place; the graphs are restored afterwards."""
    before = {name: gm.code for name, gm in program.graphs.items()}
    for gm in program.graphs.values():
        observe_attention(gm, regions)
    try:
        for inputs in batches:
            program.run(inputs)
        stats = {name: attention_stats(gm) for name, gm in program.graphs.items()}
    finally:
        for gm in program.graphs.values():
            remove_attention_observers(gm)
    _require_unchanged(program, before, "observe_attention")
    return stats


def observe_teacher(program: Program, recipe, batches: list) -> dict[str, dict[int, BlockStats]]:
    """Teacher statistics from the float (captured, not yet quantized) program; annotates its linears first."""
    for gm in program.graphs.values():
        classify_linears(gm, recipe.role_overrides)
        assign_regions(gm, recipe.region_overrides)
    return observe_program(program, batches)


def match_attention_scales(program: Program, recipe, batches: list, teacher: dict[str, dict[int, BlockStats]],
                           style: AtmStyle) -> dict:
    """Observe the (lowered) student, compute α/β against `teacher`, fold them; returns the record for the report."""
    student = observe_program(program, batches)
    record = {"atm": recipe.atm, "ohb": recipe.ohb, "atm_style": dataclasses.asdict(style),
              "ohb_log_clip": recipe.ohb_log_clip, "ohb_neutral": recipe.ohb_neutral, "batches": len(batches),
              "graphs": {}}
    for name, gm in program.graphs.items():
        rows, alphas, betas = [], {}, {}
        for site in attention_sites(gm, SCOPE):
            t, s = teacher.get(name, {}).get(site.block), student[name].get(site.block)
            if t is None or s is None:
                continue
            row = _site_row(gm, site, t, s, recipe, style)
            if recipe.atm and row["alpha_fold"] in ("q_proj", "q_norm"):
                alphas[site.block] = row["alpha"]
            if recipe.ohb and site.o_linears:
                betas[site.block] = row["beta"]
            rows.append(row)
        code = gm.code
        fold_attention_scales(gm, alphas, betas)
        if gm.code != code:
            raise ScheduleError(f"fold_attention_scales changed graph '{name}'; it must only rescale tensors")
        if rows:
            record["graphs"][name] = rows
    return record


def _site_row(gm: fx.GraphModule, site, t: BlockStats, s: BlockStats, recipe, style: AtmStyle) -> dict:
    target = alpha_target(gm, site)
    fold = target if isinstance(target, str) else ("q_proj" if target.kind == "linear" else "q_norm")
    heads = len(t.logit_std or [])
    alpha = [1.0] * heads
    if recipe.atm and t.logit_std and s.logit_std and not isinstance(target, str):
        alpha = atm_alpha(t.logit_std, s.logit_std, style)
    beta = 1.0
    if recipe.ohb and t.energy_rms is not None and s.energy_rms is not None:
        beta = ohb_beta(t.energy_rms, s.energy_rms, recipe.ohb_log_clip, recipe.ohb_neutral)
    return {"block": site.block,
            "q_proj": [n.meta["qvla"].module_path for n in site.q_linears],
            "o_proj": [n.meta["qvla"].module_path for n in site.o_linears],
            "alpha": alpha, "beta": beta, "alpha_fold": fold,
            "logit_std_teacher": t.logit_std, "logit_std_student": s.logit_std,
            "rms_teacher": t.energy_rms, "rms_student": s.energy_rms}


def _require_unchanged(program: Program, before: dict[str, str], what: str) -> None:
    for name, gm in program.graphs.items():
        if gm.code != before[name]:
            raise ScheduleError(f"{what} left graph '{name}' changed after its observers were removed")
