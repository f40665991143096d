"""The flow-matching Euler sampler shared by every policy and by the compiler.

`euler_sample` runs the observation-only prefix once and then the denoise step once per timestep. The two callables are
either a policy's own `embed_prefix` / `denoise_step` or the compiler's (quantized) graph modules, so the loop knows
nothing about either: it only threads the prefix tuple and the action chunk through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from qvla_compiler.errors import QvlaError


@dataclass(frozen=True)
class FlowSchedule:
    """Euler timesteps and step size: `x <- x + dt * v(x, t)` for each `t` in `timesteps`, in order.

    Example::

        FlowSchedule.uniform(1.0, 0.0, 10)  # pi0.5: t = 1.0, 0.9, ..., 0.1 and dt = -0.1
        FlowSchedule.uniform(0.0, 1.0, 4)   # GR00T: t = 0, 0.25, 0.5, 0.75 and dt = 0.25
    """

    timesteps: tuple[float, ...]
    dt: float

    def __post_init__(self) -> None:
        if not isinstance(self.timesteps, tuple) or len(self.timesteps) == 0:
            raise QvlaError(f"FlowSchedule.timesteps must be a non-empty tuple of floats, got {self.timesteps!r}")
        if self.dt == 0:
            raise QvlaError("FlowSchedule.dt is 0, so sampling would never move; use e.g. FlowSchedule.uniform(1, 0, 10)")

    @classmethod
    def uniform(cls, start: float, end: float, steps: int) -> "FlowSchedule":
        """`steps` equal Euler steps integrating from time `start` to time `end`."""
        if steps < 1:
            raise QvlaError(f"FlowSchedule.uniform needs steps >= 1, got {steps}")
        dt = (end - start) / steps
        # round away float drift so the timesteps read as written (0.7, not 0.7000000000000001)
        timesteps = tuple(round(start + i * dt, 12) for i in range(steps))
        return cls(timesteps=timesteps, dt=dt)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def euler_sample(
    prefix_fn: Callable[..., Any],
    denoise_fn: Callable[[Any, Tensor, Tensor], Tensor],
    obs: Mapping[str, Tensor],
    noise: Tensor,
    schedule: FlowSchedule,
) -> Tensor:
    """Integrate the flow from `noise` [B, horizon, action_dim] along `schedule`; returns the action chunk.

    `prefix = prefix_fn(**obs)` runs once; then for every timestep `t`,
    `x = x + dt * denoise_fn(prefix, x, torch.full((B,), t))`.
    """
    prefix = prefix_fn(**obs)
    x = noise
    for t in schedule.timesteps:
        t_tensor = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        x = x + schedule.dt * denoise_fn(prefix, x, t_tensor)
    return x
