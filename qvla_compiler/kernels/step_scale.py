"""`qvla::step_scale(table, bounds, t, rank)`: the static activation scale of the current flow step.

    s = table[bucketize(t, bounds)]            fp32, shape [B] + [1]·(rank-1)  (t of shape [B]), or [1]·rank (scalar t)

`table` [S] holds one calibrated scale per step (quant/step_scales.py), `bounds` [S-1] the ascending midpoints
between the schedule's timesteps. The result broadcasts against an activation of rank `rank` whose leading dim is
the batch, as qvla::quantize_act's static_scale. Plain torch on every device (a bucketize and a gather); transparent
to check_schedule, like quantize_act.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qvla_compiler.quant.step_scales import bucket_of


def step_scale_ref(table: Tensor, bounds: Tensor, t: Tensor, rank: int) -> Tensor:
    """Reference: the gather written out."""
    idx = bucket_of(t.reshape(-1), bounds)
    lead = [idx.numel()] if t.dim() > 0 else [1]
    return table.float()[idx].reshape(*lead, *([1] * (rank - 1)))


@torch.library.custom_op("qvla::step_scale", mutates_args=())
def step_scale(table: Tensor, bounds: Tensor, t: Tensor, rank: int) -> Tensor:
    return step_scale_ref(table, bounds, t, rank).clone()


@step_scale.register_fake
def _(table, bounds, t, rank):
    lead = [t.numel()] if t.dim() > 0 else [1]
    return table.new_empty((*lead, *([1] * (rank - 1))), dtype=torch.float32)
