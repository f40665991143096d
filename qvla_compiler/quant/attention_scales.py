"""Attention Temperature Matching (ATM) and Output Head Balancing (OHB): the per-head α and per-layer β, as pure math.

ATM: α_h = σ_T,h / (σ_S,h + 1e-6) per action-head attention head (σ = std of the pre-softmax logits), clipped to
[lo, hi] and snapped to 1 inside a neutral band; it multiplies that head's queries. OHB: β_l = RMS_T / (RMS_S + 1e-6)
per action-head attention layer (RMS of the o_proj output before the residual add), clipped in log space and snapped
to 1 inside a neutral band; it multiplies o_proj's output. The teacher is the float program, the student the lowered
one; calibration.match_attention_scales measures both and passes.fold_attention_scales folds α/β into tensors.
"""
from __future__ import annotations

import dataclasses
import math

from qvla_compiler.errors import CalibrationError

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
    if not all(map(math.isfinite, (*teacher_std, *student_std))):  # a NaN α would be folded into q silently
        raise CalibrationError(f"ATM: non-finite attention-logit statistics (teacher {teacher_std}, student "
                               f"{student_std}); check that the float model is finite on the calibration data")
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
