"""Programs: the captured graphs of a policy (or plain module) and how to run them end to end.

A policy program is a prefix graph and a denoise-step graph driven by the shared Euler loop; a module program is
one forward graph. The same object runs the float graphs, the observed graphs during calibration and the
lowered integer graphs, so every comparison (SQNR, action fidelity) uses identical inputs and noise.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn

from qvla_compiler.export import OBS_KEYS
from qvla_compiler.models.sampling import FlowSchedule, euler_sample


@dataclasses.dataclass
class Program:
    graphs: dict[str, fx.GraphModule]
    schedule: FlowSchedule | None = None  # None: a plain module with a single "forward" graph

    @property
    def is_policy(self) -> bool:
        return self.schedule is not None

    def run(self, inputs: Any) -> torch.Tensor:
        """Policy: inputs = (obs dict, noise) → action chunk. Module: inputs = tuple of args → output."""
        with torch.no_grad():
            return self.as_module()(*self.flat_args(inputs))

    def flat_args(self, inputs: Any) -> tuple:
        if self.is_policy:
            obs, noise = inputs
            return (*(obs[k] for k in OBS_KEYS), noise)
        return tuple(inputs)

    def as_module(self) -> nn.Module:
        if self.is_policy:
            return PolicyProgram(self.graphs["prefix"], self.graphs["denoise"], self.schedule)
        return self.graphs["forward"]


class PolicyProgram(nn.Module):
    """The whole sampler as one module: forward(images, tokens, token_mask, state, noise) -> actions."""

    def __init__(self, prefix: nn.Module, denoise: nn.Module, schedule: FlowSchedule):
        super().__init__()
        self.prefix, self.denoise, self.schedule = prefix, denoise, schedule

    def forward(self, images, tokens, token_mask, state, noise):
        obs = dict(images=images, tokens=tokens, token_mask=token_mask, state=state)
        return euler_sample(lambda **o: self.prefix(*(o[k] for k in OBS_KEYS)),
                            lambda prefix, x, t: self.denoise(tuple(prefix), x, t), obs, noise, self.schedule)


def with_noise(batches: Iterable[dict], noise_shape: tuple[int, ...], seed: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """Pair each observation batch with reproducible diffusion noise of shape [B, *noise_shape]."""
    gen = torch.Generator().manual_seed(seed)
    for obs in batches:
        batch = next(iter(obs.values())).shape[0]
        yield obs, torch.randn((batch, *noise_shape), generator=gen)
