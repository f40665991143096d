"""A miniature 2D tabletop manipulation suite, simulated in numpy.

The table is the unit square ``[0, 1]^2`` (x to the right, y downwards, like
image rows).  A point-like end effector (a small disc) moves by bounded
displacements.  Objects have a colour and a shape; ``push`` blocks slide with the
agent from the moment it touches them (a flat pusher; kinematic, no physics engine).  Zones are coloured squares.

Task families
-------------
``reach``     "reach the {colour} {shape}" among three distractors that share
              a colour or a shape with the target (language grounding).
``push``      "push the {colour} block into the {colour} zone": two blocks, two
              zones; the agent starts behind the named block (on its far side
              from the named zone, within 60 degrees of the push axis), must
              touch it, carry it and stop it on the zone centre (contact and
              precision: success is the block centre within 0.06 of the zone
              centre; with a start anywhere, which needs going round the
              block, the trained policies reached 3%: see the checkpoints README).
``sequence``  "touch the {colour} {shape} then the {colour} {shape}" among four
              objects; touching the second target first does not count
              (multi-stage, longer horizon).

Interface (close to LIBERO's)::

    env = TabletopEnv("push", seed=3)       # or make_episode("push", 3)
    obs = env.reset()      # {"image": uint8 [H,W,3], "state": float32 [STATE_DIM],
                           #  "instruction": str}
    obs, done, info = env.step(action)       # action: [ACTION_DIM] in [-1, 1]
    info["success"]

Actions are normalised displacements: each component is clipped to
``[-1, 1]`` and multiplied by ``MAX_STEP`` (table units per step).  Extra
trailing action components (padding) are ignored.

The proprioceptive state (``STATE_DIM`` = 8) is
``[2x-1, 2y-1, stage_fraction, 0, 0, 0, 0, 0]`` where ``stage_fraction`` is the
fraction of ``sequence`` targets already touched (0 for other families).  The
last displacement is deliberately not observed: a policy cloned from an expert
that heads straight for its goal learns to repeat its previous motion from it
(the "copycat" shortcut) instead of reading the image and the instruction.

Policies are chunked: ``policy_fn(batch) -> actions [B, horizon, ACTION_DIM]``
with ``batch = {"images": float [B,3,H,W] in [0,1], "tokens": int64 [B,L],
"token_mask": bool [B,L], "state": float [B,STATE_DIM]}`` (plus ``"noise"``
[B, horizon, ACTION_DIM] when the runner is given a ``noise_seed``); the
runners execute the first ``n_exec`` actions of every chunk.  For a policy
whose widths exceed the suite's (action_dim 7, state_dim 32, 48 tokens, 32x32
images...) use ``run_episodes(..., **runner_kwargs(policy.config))``: the state
is zero-padded, only the first 2 action components are executed.  The runners
live in :mod:`qvla_compiler.eval.runner` (re-exported here for older importers).

Images are drawn at ``SUPERSAMPLE`` x resolution and box-filtered down
(anti-aliasing: sub-pixel positions show in the edge pixels); only the windows
around moving things are re-rendered each step.  At 32x32 an object is about
4 pixels across and a circle is hard to tell from a square, which is why the
trained tabletop policies see 64x64.
"""

from __future__ import annotations

import numpy as np

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.tasks import (  # the constants and state classes are public here too
    ACTION_DIM, AGENT_RADIUS, BLOCK_RADIUS, COLOURS, FAMILIES, IMAGE_SIZE, MAX_STEP, MAX_STEPS,
    OBJECT_RADIUS, SHAPES, STATE_DIM, TEMPLATES, TOUCH_TOL, ZONE_HALF, ZONE_TOL, TableObject,
    TabletopState, Zone, _check_family, _check_seed, _generate,
)

__all__ = [
    "FAMILIES", "MAX_STEPS", "IMAGE_SIZE", "STATE_DIM", "ACTION_DIM", "MAX_STEP",
    "COLOURS", "SHAPES", "TEMPLATES",
    "TableObject", "Zone", "TabletopState", "TabletopEnv", "make_episode",
]


# ----------------------------------------------------------------------------- rendering

_TABLE_RGB = np.array((200, 190, 170), dtype=np.uint8)
_AGENT_RGB = np.array((25, 25, 25), dtype=np.uint8)
_AGENT_DRAW_RADIUS = 0.04
SUPERSAMPLE = 2          # render at SUPERSAMPLE x the image size, then box-filter down (anti-aliasing)


class _Canvas:
    """Pixel-centre coordinates for one image size (cached per size)."""

    _cache: dict[int, "_Canvas"] = {}

    def __init__(self, size: int):
        self.size = size
        self.coords = (np.arange(size) + 0.5) / size

    @classmethod
    def get(cls, size: int) -> "_Canvas":
        if size not in cls._cache:
            cls._cache[size] = _Canvas(size)
        return cls._cache[size]

    def draw(self, img: np.ndarray, shape: str, centre: np.ndarray, r: float, rgb,
             origin: tuple[int, int] = (0, 0)) -> None:
        """Fill ``shape`` into ``img``, a window of this canvas whose top-left pixel is ``origin``."""
        n = self.size
        x, y = float(centre[0]), float(centre[1])
        o0, o1 = origin
        r0, r1 = max(int((y - 1.1 * r) * n), o0), min(int((y + r) * n) + 2, o0 + img.shape[0])
        c0, c1 = max(int((x - r) * n), o1), min(int((x + r) * n) + 2, o1 + img.shape[1])
        if r0 >= r1 or c0 >= c1:
            return
        ys = self.coords[r0:r1, None] - y
        xs = self.coords[None, c0:c1] - x
        if shape == "circle":
            mask = xs * xs + ys * ys <= r * r
        elif shape == "square":
            h = 0.85 * r
            mask = (np.abs(xs) <= h) & (np.abs(ys) <= h)
        elif shape == "triangle":  # apex up (towards row 0)
            mask = (ys <= 0.8 * r) & (ys >= -1.1 * r) & (np.abs(xs) <= (ys + 1.1 * r) * 0.6)
        elif shape == "zone":
            mask = (np.abs(xs) <= r) & (np.abs(ys) <= r)
        else:
            raise QvlaError(f"cannot draw shape {shape!r}")
        img[r0 - o0:r1 - o0, c0 - o1:c1 - o1][mask] = rgb


def _box_down(img: np.ndarray, k: int) -> np.ndarray:
    """Average k x k pixel blocks (rounded), uint8 -> uint8."""
    acc = np.zeros((img.shape[0] // k, img.shape[1] // k, 3), dtype=np.uint16)
    for i in range(k):
        for j in range(k):
            acc += img[i::k, j::k]
    acc += (k * k) // 2
    acc //= k * k
    return acc.astype(np.uint8)


def _zone_rgb(colour: str) -> np.ndarray:
    c = np.array(COLOURS[colour], dtype=np.float64)
    return np.round(0.55 * c + 0.45 * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- environment


class TabletopEnv:
    """One episode of one task family, deterministic from ``seed``."""

    def __init__(self, family: str, seed: int, image_size: int = IMAGE_SIZE):
        _check_family(family)
        self.family = family
        self.seed = _check_seed(seed)
        if not isinstance(image_size, (int, np.integer)) or image_size < 8:
            raise QvlaError(f"image_size must be an int >= 8, got {image_size!r}")
        self.image_size = int(image_size)
        self.max_steps = MAX_STEPS[family]
        self._canvas = _Canvas.get(self.image_size * SUPERSAMPLE)
        self._initial = _generate(family, self.seed)
        self._state: TabletopState = self._initial.copy()
        self._static: np.ndarray | None = None     # SUPERSAMPLE x resolution
        self._static_lo: np.ndarray | None = None
        self._done = False
        self._success = False

    # -- LIBERO-like API ---------------------------------------------------------------
    @property
    def instruction(self) -> str:
        return self._state.instruction

    def reset(self) -> dict:
        """Back to the seed's initial state; returns the first observation."""
        self.set_state(self._initial)
        return self.observe()

    def step(self, action) -> tuple[dict, bool, dict]:
        info = self.advance(action)
        return self.observe(), self._done, info

    def advance(self, action) -> dict:
        """:meth:`step` without rendering the observation (for planning on a scratch env); returns ``info``."""
        if self._done:
            raise QvlaError("step() after the episode ended; call reset() first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.size < 2:
            raise QvlaError(f"action needs at least 2 components (dx, dy), got shape {np.shape(action)}")
        a = a[:2]
        nonfinite = not bool(np.all(np.isfinite(a)))
        if nonfinite:  # a broken policy fails the episode; it does not crash the evaluation
            a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0)
        a = np.clip(a, -1.0, 1.0)
        s = self._state
        old = s.agent.copy()
        s.agent = np.clip(old + a * MAX_STEP, 0.0, 1.0)
        if s.family == "push":
            self._resolve_contacts(old)
        s.velocity = (s.agent - old) / MAX_STEP
        if s.family == "sequence":
            while s.stage < len(s.targets) and \
                    np.linalg.norm(s.agent - s.objects[s.targets[s.stage]].pos) <= TOUCH_TOL:
                s.stage += 1
        s.t += 1
        self._success = self.check_success()
        self._done = self._success or s.t >= s.max_steps
        return {"success": self._success, "t": s.t, "stage": s.stage, "nonfinite_action": nonfinite}

    # -- state access (expert, tests) ---------------------------------------------------
    def get_state(self) -> TabletopState:
        return self._state.copy()

    @property
    def state(self) -> TabletopState:
        """The live state, not a copy: read it, do not change it (:meth:`get_state` / :meth:`set_state` for that)."""
        return self._state

    def set_state(self, state: TabletopState) -> None:
        if state.family != self.family:
            raise QvlaError(f"state of family {state.family!r} given to a {self.family!r} env")
        self._state = state.copy()
        self._static = None
        self._success = self.check_success()
        self._done = self._success or self._state.t >= self._state.max_steps

    @property
    def done(self) -> bool:
        return self._done

    def check_success(self) -> bool:
        s = self._state
        if s.family == "reach":
            return bool(np.linalg.norm(s.agent - s.objects[s.targets[0]].pos) <= TOUCH_TOL)
        if s.family == "push":
            block = s.objects[s.targets[0]].pos
            zone = s.zones[s.goal_zone].pos
            return bool(np.max(np.abs(block - zone)) <= ZONE_TOL)
        return s.stage >= len(s.targets)

    # -- observation --------------------------------------------------------------------
    def observe(self) -> dict:
        return {"image": self.render(), "state": self.proprio(), "instruction": self._state.instruction}

    def proprio(self) -> np.ndarray:
        s = self._state
        out = np.zeros(STATE_DIM, dtype=np.float32)
        out[0:2] = 2.0 * s.agent - 1.0
        if s.family == "sequence":
            out[2] = s.stage / len(s.targets)
        return out

    def _dynamic_items(self) -> list[tuple]:
        s = self._state
        items = [(o.shape, o.pos, BLOCK_RADIUS / 0.85, COLOURS[o.colour])  # drawn half side = BLOCK_RADIUS
                 for o in s.objects if o.movable]
        items.append(("circle", s.agent, _AGENT_DRAW_RADIUS, _AGENT_RGB))
        return items

    def _static_layer(self) -> np.ndarray:
        if self._static is None:
            s = self._state
            n = self.image_size * SUPERSAMPLE
            img = np.empty((n, n, 3), dtype=np.uint8)
            img[:] = _TABLE_RGB
            for z in s.zones:
                self._canvas.draw(img, "zone", z.pos, z.half, _zone_rgb(z.colour))
            for o in s.objects:
                if not o.movable:
                    self._canvas.draw(img, o.shape, o.pos, OBJECT_RADIUS, COLOURS[o.colour])
            self._static = img
            self._static_lo = _box_down(img, SUPERSAMPLE)
        return self._static

    def render_reference(self) -> np.ndarray:
        """Full-frame render (slow path); :meth:`render` must equal it bit for bit."""
        img = self._static_layer().copy()
        for item in self._dynamic_items():
            self._canvas.draw(img, *item)
        return _box_down(img, SUPERSAMPLE)

    def render(self) -> np.ndarray:
        """uint8 [H, W, 3]: the cached static layer, with only the windows around
        moving things (agent, blocks) re-rendered at SUPERSAMPLE x and filtered down."""
        static = self._static_layer()
        out = self._static_lo.copy()
        items = self._dynamic_items()
        n, k = self.image_size, SUPERSAMPLE
        for _, pos, r, _ in items:
            rr = 1.15 * r
            r0, r1 = max(int((pos[1] - rr) * n), 0), min(int((pos[1] + rr) * n) + 2, n)
            c0, c1 = max(int((pos[0] - rr) * n), 0), min(int((pos[0] + rr) * n) + 2, n)
            if r0 >= r1 or c0 >= c1:
                continue
            patch = static[r0 * k:r1 * k, c0 * k:c1 * k].copy()
            for item in items:  # every moving thing, in order, so overlaps come out right
                self._canvas.draw(patch, *item, origin=(r0 * k, c0 * k))
            out[r0:r1, c0:c1] = _box_down(patch, k)
        return out

    # -- physics ------------------------------------------------------------------------
    def _resolve_contacts(self, old: np.ndarray) -> None:
        """Blocks slide with the pusher from the moment it touches them (a flat pusher face-on), so the block
        goes where the agent goes. Point-contact pushing, where the block runs off along the contact normal, is a
        balancing act: with it the scripted expert failed under small position errors (bench_expert_noise.py)."""
        s = self._state
        reach = AGENT_RADIUS + BLOCK_RADIUS
        move = s.agent - old
        for o in s.objects:
            if not o.movable:
                continue
            if float(np.linalg.norm(o.pos - s.agent)) >= reach:
                continue
            touch = _touch_time(old, move, o.pos, reach)
            if touch is not None:   # moving into it: it slides along with the rest of the step
                o.pos = np.clip(o.pos + (1.0 - touch) * move, BLOCK_RADIUS, 1.0 - BLOCK_RADIUS)
            d = o.pos - s.agent
            dist = float(np.linalg.norm(d))
            if dist < reach:      # glancing contact, or the block is against the wall: separate along the normal
                u = d / dist if dist > 1e-9 else np.array([1.0, 0.0])
                o.pos = np.clip(s.agent + u * reach, BLOCK_RADIUS, 1.0 - BLOCK_RADIUS)
                d = s.agent - o.pos
                dist = float(np.linalg.norm(d))
                if dist < reach:  # block is against the wall: the agent stops at its surface
                    u = d / dist if dist > 1e-9 else -u
                    s.agent = np.clip(o.pos + u * reach, 0.0, 1.0)


def _touch_time(start: np.ndarray, move: np.ndarray, centre: np.ndarray, reach: float) -> float | None:
    """Fraction of ``move`` after which a point leaving ``start`` is first within ``reach`` of ``centre``;
    None unless the move heads into the circle (0 when it starts inside)."""
    rel = start - centre
    if float(move @ -rel) <= 0.0:
        return None
    c = float(rel @ rel) - reach * reach
    if c <= 0.0:
        return 0.0
    a, b = float(move @ move), float(move @ rel)
    disc = b * b - a * c
    if a <= 0.0 or disc < 0.0:
        return None
    t = (-b - disc ** 0.5) / a
    return t if 0.0 <= t <= 1.0 else None


def make_episode(family: str, seed: int, image_size: int = IMAGE_SIZE) -> TabletopEnv:
    return TabletopEnv(family, seed, image_size=image_size)
