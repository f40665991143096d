"""Action-guided mixed precision (ActQuant-style): one weight bit-width per linear under a bits-per-weight budget.

Each candidate linear's sensitivity is measured directly: the action-chunk error e (relative L2 against float) when
only that linear's weight is rounded to `b` bits, for every candidate width (calibration.measure_weight_sensitivity).
The linears' rounding errors are taken as independent, so their squares add (‖Σ δ_i‖² ≈ Σ ‖δ_i‖²; the predicted
action error is √Σ e²; minimising Σ e instead gave as much or more action error in 7 of 8 small-preset allocations,
RESULTS §17). The widths minimising Σ e² under the budget are found exactly by dynamic programming over the extra
bits (a multiple-choice knapsack; the bit unit is the gcd of the costs, coarsened only when that would need more
than MAX_UNITS cells). Widths: 2, 3, 4 and 8 (the kernels' integer formats, ops.WEIGHT_BITS; 2 bits is -2..1) and
16 (stays float, counted as bf16). Bits per weight count the integers only, not the group scales (bf16 per 128
weights: +0.125).
"""
from __future__ import annotations

import math

import numpy as np

from qvla_compiler.kernels.ops import WEIGHT_BITS

WIDTHS = (*WEIGHT_BITS, 16)  # 16 = the linear stays float (bf16 bytes)
MAX_UNITS = 200_000  # DP cells over the budget; beyond it the unit is coarsened (costs rounded up: budget still kept)


def allocate_bits(errors: dict[str, dict[int, float]], params: dict[str, int], bpw: float) -> dict[str, int]:
    """Module path → weight width minimising Σ errors[path][width]² with Σ params·width ≤ bpw · Σ params.

    `errors[path]` holds the error at each measured width (16 is 0); a width not measured is not a candidate.
    Deterministic: paths in sorted order, ties keep the narrower width."""
    paths = sorted(params)
    total = sum(params.values())
    if not paths or total == 0:
        return {}
    spare = bpw * total - WIDTHS[0] * total
    if spare < -1e-9:
        raise ValueError(f"a budget of {bpw} bits per weight is below the narrowest width {WIDTHS[0]}")
    extra = [[params[p] * (w - WIDTHS[0]) for w in WIDTHS] for p in paths]
    unit = math.gcd(*[c for row in extra for c in row if c]) or 1
    unit = max(unit, math.ceil(spare / MAX_UNITS))
    cells = int(spare // unit) + 1
    cost = [[math.ceil(c / unit) for c in row] for row in extra]
    best = np.zeros(cells)  # best[b]: least error of the paths so far within b units of extra bits
    choice = np.zeros((len(paths), cells), dtype=np.int8)
    for i, path in enumerate(paths):
        options = np.full((len(WIDTHS), cells), np.inf)
        for j, w in enumerate(WIDTHS):
            c = cost[i][j]
            if c < cells:
                options[j, c:] = best[:cells - c] + _err(errors, path, w)
        choice[i] = options.argmin(0)  # argmin keeps the first (narrowest) of equal options
        best = options.min(0)
    if not np.isfinite(best[-1]):
        raise ValueError(f"a budget of {bpw} bits per weight is below the narrowest measured widths")
    widths, b = {}, cells - 1
    for i in range(len(paths) - 1, -1, -1):
        j = int(choice[i, b])
        widths[paths[i]] = WIDTHS[j]
        b -= cost[i][j]
    return widths


def average_bits(widths: dict[str, int], params: dict[str, int]) -> float:
    total = sum(params[p] for p in widths)
    return sum(widths[p] * params[p] for p in widths) / total if total else 0.0


def _err(errors: dict[str, dict[int, float]], path: str, width: int) -> float:
    return 0.0 if width == 16 else errors[path].get(width, math.inf) ** 2
