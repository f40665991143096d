"""Task families of the tabletop suite: constants, episode state and seeded generation.

The environment that steps and renders these states is
:class:`qvla_compiler.eval.tabletop.TabletopEnv`; the public constants and
state classes are re-exported from :mod:`qvla_compiler.eval.tabletop`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from qvla_compiler.errors import QvlaError

__all__ = [
    "FAMILIES", "MAX_STEPS", "IMAGE_SIZE", "STATE_DIM", "ACTION_DIM", "MAX_STEP",
    "AGENT_RADIUS", "OBJECT_RADIUS", "BLOCK_RADIUS", "TOUCH_TOL", "ZONE_HALF", "ZONE_TOL",
    "COLOURS", "SHAPES", "TEMPLATES", "TableObject", "Zone", "TabletopState", "redraw_push_start",
]


# ----------------------------------------------------------------------------- constants

FAMILIES: tuple[str, ...] = ("reach", "push", "sequence")
MAX_STEPS: dict[str, int] = {"reach": 30, "push": 70, "sequence": 50}

IMAGE_SIZE = 64
STATE_DIM = 8
ACTION_DIM = 2

MAX_STEP = 0.05          # table units per step at |action component| = 1
AGENT_RADIUS = 0.03      # collision radius of the end effector
OBJECT_RADIUS = 0.065    # drawn size of reach / sequence objects
BLOCK_RADIUS = 0.05      # collision radius of push blocks (drawn as squares)
TOUCH_TOL = 0.05         # reach / touch: agent centre within this of the object centre
ZONE_HALF = 0.1          # zones are squares of half side ZONE_HALF
ZONE_TOL = 0.06          # push success: block centre within this (L-inf) of the zone centre
PUSH_START_ANGLE = 60.0  # push episodes start behind the block, within this many degrees of the push axis

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (150, 60, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "reach": ("reach the {c1} {s1}", "go to the {c1} {s1}", "move to the {c1} {s1}"),
    "push": ("push the {c1} block into the {c2} zone", "push the {c1} block to the {c2} zone"),
    "sequence": ("touch the {c1} {s1} then the {c2} {s2}",
                 "touch the {c1} {s1} and then the {c2} {s2}"),
}

_FAMILY_INDEX = {f: i for i, f in enumerate(FAMILIES)}


def _check_family(family: str) -> None:
    if family not in MAX_STEPS:
        raise QvlaError(f"unknown task family {family!r}; use one of {list(FAMILIES)}")


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise QvlaError(f"episode seed must be a non-negative int, got {seed!r}")
    return int(seed)


# ----------------------------------------------------------------------------- state


@dataclass
class TableObject:
    colour: str
    shape: str
    pos: np.ndarray            # float64 [2]
    movable: bool = False      # push blocks are movable (kinematic contact)


@dataclass
class Zone:
    colour: str
    pos: np.ndarray            # float64 [2], centre
    half: float = ZONE_HALF


@dataclass
class TabletopState:
    """Everything that defines an episode at one moment (what the expert reads)."""

    family: str
    agent: np.ndarray                      # float64 [2]
    velocity: np.ndarray                   # float64 [2], last displacement / MAX_STEP
    objects: list[TableObject]
    zones: list[Zone]
    targets: list[int]                     # indices into objects, in order
    goal_zone: int | None                  # index into zones (push)
    instruction: str
    stage: int = 0                         # targets touched so far (sequence)
    t: int = 0
    max_steps: int = 0
    meta: dict = field(default_factory=dict)

    def copy(self) -> "TabletopState":
        """An independent copy (by hand: ``copy.deepcopy`` was most of the cost of DAgger's expert planning)."""
        return dataclasses.replace(
            self, agent=self.agent.copy(), velocity=self.velocity.copy(),
            objects=[dataclasses.replace(o, pos=o.pos.copy()) for o in self.objects],
            zones=[dataclasses.replace(z, pos=z.pos.copy()) for z in self.zones],
            targets=list(self.targets), meta=copy.deepcopy(self.meta))


# ----------------------------------------------------------------------------- generation


def _sample_points(rng: np.random.Generator, n: int, lo: float, hi: float, min_sep: float,
                   avoid: Sequence[np.ndarray] = (), avoid_sep: float = 0.0) -> list[np.ndarray]:
    pts: list[np.ndarray] = []
    for _ in range(10000):
        if len(pts) == n:
            return pts
        p = rng.uniform(lo, hi, size=2)
        if all(np.linalg.norm(p - q) >= min_sep for q in pts) and \
                all(np.linalg.norm(p - q) >= avoid_sep for q in avoid):
            pts.append(p)
    raise QvlaError("could not place objects without overlap; this is a bug in the generator")


def _grounding_distractors(rng: np.random.Generator, target: tuple[str, str],
                           n: int, taken: set) -> list[tuple[str, str]]:
    """Distractors that share the colour or the shape of the target where possible."""
    colours, shapes = list(COLOURS), list(SHAPES)
    c, s = target
    same_colour = [(c, s2) for s2 in shapes if (c, s2) not in taken]
    same_shape = [(c2, s) for c2 in colours if (c2, s) not in taken]
    out: list[tuple[str, str]] = []
    for pool in (same_colour, same_shape):
        if pool and len(out) < n:
            pick = pool[rng.integers(len(pool))]
            out.append(pick)
            taken.add(pick)
    rest = [(c2, s2) for c2 in colours for s2 in shapes if (c2, s2) not in taken]
    while len(out) < n:
        pick = rest.pop(int(rng.integers(len(rest))))
        out.append(pick)
        taken.add(pick)
    return out


def _push_start(rng: np.random.Generator, block: np.ndarray, zone: np.ndarray, avoid: np.ndarray,
                max_angle: float = PUSH_START_ANGLE) -> np.ndarray:
    """A start 0.15-0.3 from ``block`` on its far side from ``zone`` (within ``max_angle`` degrees of the push axis;
    180: anywhere around the block)."""
    back = (block - zone) / np.linalg.norm(block - zone)
    for _ in range(10000):
        phi = math.radians(rng.uniform(-max_angle, max_angle))
        c, s = math.cos(phi), math.sin(phi)
        p = block + rng.uniform(0.15, 0.3) * np.array([c * back[0] - s * back[1], s * back[0] + c * back[1]])
        if np.all((p >= 0.08) & (p <= 0.92)) and np.linalg.norm(p - avoid) >= 0.15:
            return p
    raise QvlaError(f"no push start 0.15-0.3 from the block within {max_angle:g} degrees of the push axis fits on "
                    "the table clear of the other block; with the suite's angle this is a generator bug, with a "
                    "narrower redraw_push_start(max_angle=...) widen the angle")


def redraw_push_start(state: TabletopState, seed: int, max_angle: float = 180.0) -> TabletopState:
    """A copy of a push episode's initial ``state`` with the agent redrawn 0.15-0.3 from the named block, within
    ``max_angle`` degrees of the push axis (180: anywhere around the block, in front of it too).

    For training data only (``collect_demonstrations(wide_push_starts=...)``): the suite's episodes keep
    PUSH_START_ANGLE. Starts beside and in front of the block are where a policy lands when it cuts the corner
    of the line-up, so demonstrations from there teach it to go back round.
    """
    if state.family != "push" or state.t != 0:
        raise QvlaError(f"redraw_push_start needs the initial state of a push episode, got family "
                        f"{state.family!r} at step {state.t}")
    if not 0.0 < max_angle <= 180.0:
        raise QvlaError(f"max_angle must be in (0, 180] degrees, got {max_angle}")
    out = state.copy()
    tb = state.targets[0]
    out.agent = _push_start(np.random.default_rng([seed, 104729]), state.objects[tb].pos,
                            state.zones[state.goal_zone].pos, state.objects[1 - tb].pos, max_angle)
    return out


def _generate(family: str, seed: int) -> TabletopState:
    rng = np.random.default_rng([seed, _FAMILY_INDEX[family], 7919])
    colours, shapes = list(COLOURS), list(SHAPES)
    template = TEMPLATES[family][int(rng.integers(len(TEMPLATES[family])))]
    if family in ("reach", "sequence"):
        n_obj = 4
        first = (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
        taken = {first}
        combos = [first] + _grounding_distractors(rng, first, n_obj - 1, taken)
        order = rng.permutation(n_obj)
        combos = [combos[i] for i in order]
        pos = _sample_points(rng, n_obj, 0.12, 0.88, min_sep=0.2)
        agent = _sample_points(rng, 1, 0.08, 0.92, min_sep=0.0, avoid=pos, avoid_sep=0.15)[0]
        objects = [TableObject(c, s, p) for (c, s), p in zip(combos, pos)]
        t0 = int(np.where(order == 0)[0][0])
        if family == "reach":
            targets = [t0]
            instr = template.format(c1=combos[t0][0], s1=combos[t0][1])
        else:
            others = [i for i in range(n_obj) if i != t0]
            t1 = others[int(rng.integers(len(others)))]
            if rng.random() < 0.5:
                t0, t1 = t1, t0
            targets = [t0, t1]
            instr = template.format(c1=combos[t0][0], s1=combos[t0][1],
                                    c2=combos[t1][0], s2=combos[t1][1])
        return TabletopState(family, agent, np.zeros(2), objects, [], targets, None, instr,
                             max_steps=MAX_STEPS[family])
    # push: two blocks, two zones
    block_colours = [colours[i] for i in rng.choice(len(colours), size=2, replace=False)]
    zone_colours = [colours[i] for i in rng.choice(len(colours), size=2, replace=False)]
    zones_pos = _sample_points(rng, 2, 0.15, 0.85, min_sep=2 * ZONE_HALF + 0.1)
    blocks_pos = _sample_points(rng, 2, 0.25, 0.75, min_sep=0.2, avoid=zones_pos,
                                avoid_sep=ZONE_HALF * math.sqrt(2) + BLOCK_RADIUS + 0.05)
    tb, tz = int(rng.integers(2)), int(rng.integers(2))
    agent = _push_start(rng, blocks_pos[tb], zones_pos[tz], avoid=blocks_pos[1 - tb])
    objects = [TableObject(c, "square", p, movable=True) for c, p in zip(block_colours, blocks_pos)]
    zones = [Zone(c, p) for c, p in zip(zone_colours, zones_pos)]
    instr = template.format(c1=block_colours[tb], c2=zone_colours[tz])
    return TabletopState(family, agent, np.zeros(2), objects, zones, [tb], tz, instr,
                         max_steps=MAX_STEPS[family])
