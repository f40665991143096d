"""A miniature 2D tabletop manipulation suite, simulated in numpy.

The table is the unit square ``[0, 1]^2`` (x to the right, y downwards, like
image rows).  A point-like end effector (a small disc) moves by bounded
displacements.  Objects have a colour and a shape; ``push`` blocks are moved
by simple kinematic disc-disc contact.  Zones are coloured squares.

Task families
-------------
``reach``     "reach the {colour} {shape}" among three distractors that share
              a colour or a shape with the target (language grounding).
``push``      "push the {colour} block into the {colour} zone": two blocks, two
              zones; the block moves only when the agent pushes it, so the
              agent has to get behind it first (contact and precision).
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
``[2x-1, 2y-1, vx, vy, stage_fraction, 0, 0, 0]`` where ``v`` is the last
realised displacement divided by ``MAX_STEP`` and ``stage_fraction`` is the
fraction of ``sequence`` targets already touched (0 for other families).

Policies are chunked: ``policy_fn(batch) -> actions [B, horizon, ACTION_DIM]``
with ``batch = {"images": float [B,3,H,W] in [0,1], "tokens": int64 [B,L],
"token_mask": bool [B,L], "state": float [B,STATE_DIM]}`` (plus ``"noise"``
[B, horizon, ACTION_DIM] when the runner is given a ``noise_seed``); the
runners execute the first ``n_exec`` actions of every chunk.  For a policy
whose widths exceed the suite's (action_dim 7, state_dim 32, 48 tokens, 32x32
images...) use ``run_episodes(..., **runner_kwargs(policy.config))``: the state
is zero-padded, only the first 2 action components are executed.

Images are drawn at ``SUPERSAMPLE`` x resolution and box-filtered down, so
shapes stay recognisable at 32x32; only the windows around moving things are
re-rendered each step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from qvla_compiler.errors import QvlaError

__all__ = [
    "FAMILIES", "MAX_STEPS", "IMAGE_SIZE", "STATE_DIM", "ACTION_DIM", "MAX_STEP",
    "COLOURS", "SHAPES", "TEMPLATES",
    "TableObject", "Zone", "TabletopState", "TabletopEnv", "make_episode",
    "EpisodeResult", "obs_to_batch", "episode_noise", "run_episode", "run_episodes",
    "sample_actions_policy", "runner_kwargs",
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

_TABLE_RGB = np.array((200, 190, 170), dtype=np.uint8)
_AGENT_RGB = np.array((25, 25, 25), dtype=np.uint8)
_AGENT_DRAW_RADIUS = 0.04
SUPERSAMPLE = 2          # render at SUPERSAMPLE x the image size, then box-filter down (anti-aliasing)
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
        return copy.deepcopy(self)


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
    agent = _sample_points(rng, 1, 0.08, 0.92, min_sep=0.0, avoid=blocks_pos, avoid_sep=0.15)[0]
    objects = [TableObject(c, "square", p, movable=True) for c, p in zip(block_colours, blocks_pos)]
    zones = [Zone(c, p) for c, p in zip(zone_colours, zones_pos)]
    tb, tz = int(rng.integers(2)), int(rng.integers(2))
    instr = template.format(c1=block_colours[tb], c2=zone_colours[tz])
    return TabletopState(family, agent, np.zeros(2), objects, zones, [tb], tz, instr,
                         max_steps=MAX_STEPS[family])


# ----------------------------------------------------------------------------- rendering


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
            self._resolve_contacts()
        s.velocity = (s.agent - old) / MAX_STEP
        if s.family == "sequence":
            while s.stage < len(s.targets) and \
                    np.linalg.norm(s.agent - s.objects[s.targets[s.stage]].pos) <= TOUCH_TOL:
                s.stage += 1
        s.t += 1
        self._success = self.check_success()
        self._done = self._success or s.t >= s.max_steps
        info = {"success": self._success, "t": s.t, "stage": s.stage, "nonfinite_action": nonfinite}
        return self.observe(), self._done, info

    # -- state access (expert, tests) ---------------------------------------------------
    def get_state(self) -> TabletopState:
        return self._state.copy()

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
        out[2:4] = s.velocity
        if s.family == "sequence":
            out[4] = s.stage / len(s.targets)
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
    def _resolve_contacts(self) -> None:
        s = self._state
        reach = AGENT_RADIUS + BLOCK_RADIUS
        for o in s.objects:
            if not o.movable:
                continue
            d = o.pos - s.agent
            dist = float(np.linalg.norm(d))
            if dist >= reach:
                continue
            u = d / dist if dist > 1e-9 else np.array([1.0, 0.0])
            o.pos = np.clip(s.agent + u * reach, BLOCK_RADIUS, 1.0 - BLOCK_RADIUS)
            d = s.agent - o.pos
            dist = float(np.linalg.norm(d))
            if dist < reach:  # block is against the wall: the agent stops at its surface
                u = d / dist if dist > 1e-9 else -u
                s.agent = np.clip(o.pos + u * reach, 0.0, 1.0)


def make_episode(family: str, seed: int, image_size: int = IMAGE_SIZE) -> TabletopEnv:
    return TabletopEnv(family, seed, image_size=image_size)


# ----------------------------------------------------------------------------- runners


@dataclass
class EpisodeResult:
    family: str
    seed: int
    success: bool
    steps: int
    policy_calls: int
    instruction: str
    nonfinite_actions: int = 0
    frames: list[np.ndarray] | None = None   # uint8 [H,W,3] per observation when recorded


def _pad_state(state: np.ndarray, state_dim: int | None) -> np.ndarray:
    if state_dim is None or state_dim == state.shape[-1]:
        return state
    if state_dim < state.shape[-1]:
        raise QvlaError(f"state_dim={state_dim} is smaller than the suite's STATE_DIM={STATE_DIM}; "
                        f"use a policy with state_dim >= {STATE_DIM}")
    pad = np.zeros(state.shape[:-1] + (state_dim - state.shape[-1],), dtype=state.dtype)
    return np.concatenate([state, pad], axis=-1)


def obs_to_batch(observations: Sequence[dict], tokenizer=None, device=None,
                 state_dim: int | None = None) -> dict:
    """Stack env observations into the policy's batch dict.

    ``state_dim`` > STATE_DIM zero-pads the state (policies with a wider state).
    """
    if tokenizer is None:
        from qvla_compiler.eval.tokenizer import default_tokenizer
        tokenizer = default_tokenizer()
    images = np.stack([o["image"] for o in observations])          # [B,H,W,3] uint8
    images = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()
    state = _pad_state(np.stack([o["state"] for o in observations]).astype(np.float32), state_dim)
    tokens, mask = tokenizer.encode_batch([o["instruction"] for o in observations])
    batch = {"images": images, "tokens": tokens, "token_mask": mask, "state": torch.from_numpy(state)}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def episode_noise(noise_seed: int, family: str, seed: int, call_index: int,
                  horizon: int, action_dim: int = ACTION_DIM) -> torch.Tensor:
    """Standard-normal noise [horizon, action_dim] for one policy call of one episode.

    Depends only on (noise_seed, family, episode seed, call index), never on
    which other episodes share the batch, so two policies evaluated with the
    same ``noise_seed`` see identical initial noise at every call.
    """
    _check_family(family)
    ss = np.random.SeedSequence([_check_seed(noise_seed), _FAMILY_INDEX[family],
                                 _check_seed(seed), _check_seed(call_index), 1013])
    g = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0]))
    return torch.randn(horizon, action_dim, generator=g, dtype=torch.float32)


def sample_actions_policy(model) -> Callable[[dict], torch.Tensor]:
    """Wrap a policy with ``sample_actions(images, tokens, token_mask, state, *, noise)``.

    The runner must be given ``noise_seed`` (and the model's horizon / action_dim,
    see :func:`runner_kwargs`) so every call carries ``batch["noise"]``.
    """

    def fn(batch: dict) -> torch.Tensor:
        if "noise" not in batch:
            raise QvlaError("sample_actions needs noise: pass noise_seed= and horizon= to the runner")
        with torch.no_grad():
            return model.sample_actions(batch["images"], batch["tokens"], batch["token_mask"],
                                        batch["state"], noise=batch["noise"])

    return fn


def runner_kwargs(config) -> dict:
    """Runner keyword arguments that fit a policy config (image_size, max_tokens,
    state_dim, horizon, action_dim, vocab_size): pass as ``run_episodes(..., **runner_kwargs(cfg))``."""
    from qvla_compiler.eval.tokenizer import VOCAB_SIZE, Tokenizer
    if config.vocab_size < VOCAB_SIZE:
        raise QvlaError(f"policy vocab_size={config.vocab_size} < the suite's VOCAB_SIZE={VOCAB_SIZE}")
    if config.action_dim < 2:
        raise QvlaError(f"policy action_dim={config.action_dim} < 2 (dx, dy)")
    return {"horizon": int(config.horizon), "action_dim": int(config.action_dim),
            "state_dim": int(config.state_dim), "image_size": int(config.image_size),
            "tokenizer": Tokenizer(max_len=int(config.max_tokens))}


def _as_action_array(actions, n_batch: int, n_exec: int) -> np.ndarray:
    if isinstance(actions, torch.Tensor):
        actions = actions.detach().to("cpu", torch.float32).numpy()
    actions = np.asarray(actions, dtype=np.float32)
    if actions.ndim != 3 or actions.shape[0] != n_batch or actions.shape[1] < n_exec or actions.shape[2] < 2:
        raise QvlaError(
            f"policy_fn returned actions of shape {actions.shape}; expected [B={n_batch}, horizon>="
            f"{n_exec}, action_dim>=2]. Check the policy's horizon or lower n_exec.")
    return actions


def _run_envs(envs: list[TabletopEnv], policy_fn, n_exec: int, noise_seed, horizon, action_dim,
              state_dim, tokenizer, record_frames: bool, fixed_batch: bool, max_batch,
              device) -> list[EpisodeResult]:
    if not isinstance(n_exec, (int, np.integer)) or n_exec < 1:
        raise QvlaError(f"n_exec must be a positive int, got {n_exec!r}")
    if noise_seed is not None and (horizon is None or horizon < n_exec):
        raise QvlaError("noise_seed needs horizon= (the policy's chunk length, >= n_exec) "
                        "to draw noise of shape [B, horizon, action_dim]")
    if max_batch is not None and max_batch < 1:
        raise QvlaError(f"max_batch must be >= 1, got {max_batch}")
    if tokenizer is None:
        from qvla_compiler.eval.tokenizer import default_tokenizer
        tokenizer = default_tokenizer()
    n = len(envs)
    obs = [e.reset() for e in envs]
    frames = [[o["image"]] if record_frames else None for o in obs]
    done = [e.done for e in envs]
    success = [e.done and e.check_success() for e in envs]
    steps = [0] * n
    calls = [0] * n
    nonfinite = [0] * n
    chunk = n if max_batch is None else int(max_batch)
    while not all(done):
        active = [i for i in range(n) if not done[i]]
        for start in range(0, len(active), chunk):
            group = active[start:start + chunk]
            padded = list(group)
            if fixed_batch:
                padded += [group[-1]] * (min(chunk, n) - len(group))
            batch = obs_to_batch([obs[i] for i in padded], tokenizer, state_dim=state_dim)
            if noise_seed is not None:
                noise = [episode_noise(noise_seed, envs[i].family, envs[i].seed, calls[i], horizon, action_dim)
                         for i in group]
                noise += [torch.zeros_like(noise[0])] * (len(padded) - len(group))
                batch["noise"] = torch.stack(noise)
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            acts = _as_action_array(policy_fn(batch), len(padded), n_exec)
            for row, i in enumerate(group):
                calls[i] += 1
                for k in range(n_exec):
                    o, d, info = envs[i].step(acts[row, k])
                    obs[i] = o
                    steps[i] += 1
                    nonfinite[i] += int(info["nonfinite_action"])
                    if record_frames:
                        frames[i].append(o["image"])
                    if d:
                        done[i] = True
                        success[i] = bool(info["success"])
                        break
    return [EpisodeResult(e.family, e.seed, success[i], steps[i], calls[i], e.instruction,
                          nonfinite[i], frames[i]) for i, e in enumerate(envs)]


def run_episode(env: TabletopEnv, policy_fn, n_exec: int, *, noise_seed: int | None = None,
                horizon: int | None = None, action_dim: int = ACTION_DIM, state_dim: int | None = None,
                tokenizer=None, record_frames: bool = False, device=None) -> EpisodeResult:
    """Reset ``env`` and run it to the end with a chunked policy (receding horizon)."""
    return _run_envs([env], policy_fn, n_exec, noise_seed, horizon, action_dim, state_dim, tokenizer,
                     record_frames, False, None, device)[0]


def run_episodes(families: str | Sequence[str], seeds: Sequence[int], policy_fn, n_exec: int,
                 noise_seed: int | None = None, *, horizon: int | None = None,
                 action_dim: int = ACTION_DIM, state_dim: int | None = None, tokenizer=None,
                 image_size: int = IMAGE_SIZE, record_frames: bool = False,
                 fixed_batch: bool = False, max_batch: int | None = None,
                 device=None) -> list[EpisodeResult]:
    """Run many episodes in lockstep, batching the policy calls across episodes.

    ``families`` is one family for all seeds or one per seed.  With
    ``noise_seed`` each call gets ``batch["noise"]`` [B, horizon, action_dim]
    from :func:`episode_noise` (requires ``horizon``), so results do not depend
    on batching.  ``state_dim`` zero-pads the state; ``tokenizer`` sets the
    token length; only the first 2 action components are executed.  Finished
    episodes drop out of the batch; ``fixed_batch=True`` instead pads every
    call to the same batch size (``max_batch`` or the number of episodes) by
    repeating an active episode (static-shape compiled programs).
    """
    seeds = list(seeds)
    if isinstance(families, str):
        families = [families] * len(seeds)
    families = list(families)
    if len(families) != len(seeds):
        raise QvlaError(f"got {len(families)} families for {len(seeds)} seeds; pass one family or one per seed")
    if not seeds:
        return []
    envs = [TabletopEnv(f, s, image_size=image_size) for f, s in zip(families, seeds)]
    return _run_envs(envs, policy_fn, n_exec, noise_seed, horizon, action_dim, state_dim, tokenizer,
                     record_frames, fixed_batch, max_batch, device)
