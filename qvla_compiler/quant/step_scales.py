"""Per-denoising-step static activation scales (Ω-QVLA): pure tensor functions, no graphs.

An action head runs once per flow step, and its activation range drifts with the flow time t. With act_mode
"per_step" a static scale is calibrated per step instead of one for all steps, and the program picks the step's scale
at run time from t — a bucketize and a gather (`qvla::step_scale`), no Python branching in the graph.

Buckets are the schedule's timesteps in ascending order; a time t belongs to the bucket of its nearest timestep
(the bounds are the midpoints between neighbours), so a program run with another number of steps still picks the
closest calibrated scale.
"""
from __future__ import annotations

from typing import Sequence

import torch

from qvla_compiler.quant.quantizers import mse_clip_scale


def step_bounds(timesteps: Sequence[float]) -> torch.Tensor:
    """fp32 [S-1]: ascending midpoints between the sorted distinct timesteps (S buckets)."""
    ts = sorted(set(float(t) for t in timesteps))
    return torch.tensor([(a + b) / 2 for a, b in zip(ts, ts[1:])], dtype=torch.float32)


def bucket_of(t: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Bucket index (int64) of each time in t: the nearest calibrated timestep, ascending order."""
    return torch.bucketize(t.float(), bounds.to(t.device, torch.float32))


def row_times(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """The flow time of every row of x.reshape(-1, K): t broadcast over each sample's tokens; None when x's leading
    dim is not t's batch (tokens of several samples flattened together: the time of a row is unknown)."""
    rows = x.numel() // max(x.shape[-1], 1)
    t = t.detach().reshape(-1).float()
    if t.numel() == 1:
        return t.expand(rows)
    if x.dim() >= 2 and x.shape[0] == t.numel():
        return t.repeat_interleave(rows // t.numel())
    return None


def per_step_scales(values: torch.Tensor, weights: torch.Tensor, times: torch.Tensor, bounds: torch.Tensor,
                    qmax: int) -> torch.Tensor:
    """fp32 [S]: per bucket, the static scale chosen among that bucket's weighted |x| values as one static scale is
    (quantizers.mse_clip_scale). A bucket calibration never reached (fewer steps than the schedule) gets the scale
    of all values together."""
    buckets = bucket_of(times, bounds)
    seen = set(buckets.unique().tolist())
    overall = mse_clip_scale(values, weights, qmax) if len(seen) <= bounds.numel() else None  # only when needed
    return torch.stack([mse_clip_scale(values[buckets == b], weights[buckets == b], qmax) if b in seen else overall
                        for b in range(bounds.numel() + 1)])
