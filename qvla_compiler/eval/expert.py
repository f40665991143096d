"""Scripted expert for the tabletop suite (reads the full simulator state).

``reach`` / ``sequence``: head straight for the current target.
``push``: in the block's frame (u along block -> zone, v across): from in
front or beside, go round the block on the near side; once behind and near
the push axis, move straight along it (the block slides with the agent) and
shorten the last step so the block stops on the zone centre.

``noise_std`` adds Gaussian noise to the (normalised) executed action for
diverse demonstrations; ``act(state, return_clean=True)`` also returns the
noise-free action, which is what demonstrations record as the label.
"""

from __future__ import annotations

import numpy as np

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.tabletop import (
    ACTION_DIM, AGENT_RADIUS, BLOCK_RADIUS, MAX_STEP, TabletopState,
)

__all__ = ["ScriptedExpert"]

_CONTACT = AGENT_RADIUS + BLOCK_RADIUS
_PRE_PUSH = _CONTACT + 0.03
_ORBIT = _CONTACT + 0.05        # lateral clearance when going round the block
_BESIDE_BACK = 0.04             # the going-round waypoint sits this far behind the block's centre line
_LATERAL_TOL = 0.7 * _CONTACT   # off-axis distance up to which a straight move along the axis still carries the block


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
        """Push controller in the block's frame: u along the push axis (block -> zone), v across it.

        Decisions depend on distances (u, v), not on the agent's angle around the block (at contact an angle
        threshold flips with a few hundredths of error), and the push is a straight move along the axis, so the
        expert keeps working under perception noise (`benchmarks/bench_expert_noise.py`).
        """
        a = state.agent
        b = state.objects[state.targets[0]].pos
        z = state.zones[state.goal_zone].pos
        to_zone = z - b
        gap = float(np.linalg.norm(to_zone))
        if gap < 1e-6:
            return np.zeros(2)
        d = to_zone / gap
        n = np.array([-d[1], d[0]])
        u, v = float((a - b) @ d), float((a - b) @ n)
        if u < -0.5 * _CONTACT and abs(v) < _LATERAL_TOL:
            # behind the block, close enough to the axis that a straight move touches it: carry it to the zone
            return d * (max(0.0, -u - _CONTACT) + gap)
        if u < -_BESIDE_BACK:
            return (b - d * _PRE_PUSH) - a              # behind but off-axis: line up
        side = 1.0 if v >= 0 else -1.0
        # in front or beside: go round on the near side, to a point past the switch line (no dead stop on it)
        return (b + side * n * _ORBIT - d * (_BESIDE_BACK + 0.03)) - a
