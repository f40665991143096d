"""Scripted expert for the tabletop suite (reads the full simulator state).

``reach`` / ``sequence``: head straight for the current target.
``push``: orbit the target block at a safe radius until the agent is behind
it (opposite the goal zone), then push towards the zone centre while
correcting sideways drift; the last push shrinks so the block stops in the zone.

``noise_std`` adds Gaussian noise to the (normalised) executed action for
diverse demonstrations; ``act(state, return_clean=True)`` also returns the
noise-free action, which is what demonstrations record as the label.
"""

from __future__ import annotations

import math

import numpy as np

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.tabletop import (
    ACTION_DIM, AGENT_RADIUS, BLOCK_RADIUS, MAX_STEP, TabletopState,
)

__all__ = ["ScriptedExpert"]

_CONTACT = AGENT_RADIUS + BLOCK_RADIUS
_PRE_PUSH = _CONTACT + 0.03
_ORBIT = _CONTACT + 0.05
_ALIGN = math.radians(20.0)
_ORBIT_STEP = math.radians(45.0)


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


def _to_action(v: np.ndarray) -> np.ndarray:
    """Displacement (table units) -> normalised action with |a| <= 1."""
    a = np.asarray(v, dtype=np.float64) / MAX_STEP
    norm = float(np.linalg.norm(a))
    if norm > 1.0:
        a = a / norm
    out = np.zeros(ACTION_DIM, dtype=np.float32)
    out[:2] = a
    return out


class ScriptedExpert:
    def __init__(self, noise_std: float = 0.0, seed: int = 0):
        if noise_std < 0:
            raise QvlaError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = float(noise_std)
        self.rng = np.random.default_rng(seed)

    def act(self, state: TabletopState, return_clean: bool = False):
        clean = self.clean_action(state)
        noisy = clean
        if self.noise_std > 0:
            noisy = clean.copy()
            noisy[:2] = np.clip(clean[:2] + self.rng.normal(0.0, self.noise_std, 2), -1.0, 1.0)
        return (noisy, clean) if return_clean else noisy

    def clean_action(self, state: TabletopState) -> np.ndarray:
        if state.family in ("reach", "sequence"):
            k = min(state.stage, len(state.targets) - 1)
            return _to_action(state.objects[state.targets[k]].pos - state.agent)
        if state.family == "push":
            return _to_action(self._push(state))
        raise QvlaError(f"the expert does not know family {state.family!r}")

    @staticmethod
    def _push(state: TabletopState) -> np.ndarray:
        a = state.agent
        b = state.objects[state.targets[0]].pos
        z = state.zones[state.goal_zone].pos
        to_zone = z - b
        gap = float(np.linalg.norm(to_zone))
        if gap < 1e-6:
            return np.zeros(2)
        d = to_zone / gap
        rel = a - b
        r = float(np.linalg.norm(rel))
        phi_a = math.atan2(rel[1], rel[0])
        phi_p = math.atan2(-d[1], -d[0])
        delta = _wrap(phi_p - phi_a)
        if abs(delta) < _ALIGN:
            if r < _ORBIT + 0.03:   # behind the block: push, correcting lateral offset
                contact = b - d * _CONTACT
                return (contact - a) + d * min(MAX_STEP, gap)
            return (b - d * _PRE_PUSH) - a
        ang = phi_a + math.copysign(min(abs(delta), _ORBIT_STEP), delta)
        waypoint = b + _ORBIT * np.array([math.cos(ang), math.sin(ang)])
        return waypoint - a
