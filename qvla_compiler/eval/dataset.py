"""Expert demonstrations as action-chunk samples for flow-matching training.

One sample per step of every expert episode: the observation at step t and
the chunk of the expert's actions a_t .. a_{t+horizon-1}.  Past the end of the
episode the chunk is padded with zeros (``pad="zero"``: stand still, the task
is done) or by repeating the last action (``pad="last"``); ``chunk_mask``
marks the real (unpadded) entries.

The expert executes a noisy action (``expert_noise``) for state diversity,
while the recorded label is its noise-free action at the visited state.

:func:`collect_corrections` is the DAgger half: the states a *policy* visits,
each labelled with the chunk the expert would execute from there, so a cloned
policy also learns how to recover from its own mistakes (a missed block, a stop
short of the target), states the expert's demonstrations never reach.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.expert import ScriptedExpert
from qvla_compiler.eval.tabletop import (
    ACTION_DIM, COLOURS, FAMILIES, IMAGE_SIZE, SHAPES, STATE_DIM, TabletopEnv, TabletopState,
)
from qvla_compiler.eval.tasks import redraw_push_start
from qvla_compiler.eval.tokenizer import Tokenizer, default_tokenizer

__all__ = ["collect_demonstrations", "collect_corrections", "expert_chunk", "scene_labels", "MAX_OBJECTS"]

MAX_OBJECTS = 4
_PLANNER = ScriptedExpert()  # noise-free: only its clean_action is used


def scene_labels(state: TabletopState) -> tuple[np.ndarray, np.ndarray]:
    """What a grounded observer should know about one state (auxiliary training targets, not policy inputs).

    landmarks float32 [2, 2]: the position that matters now (reach target, current ``sequence`` target, the
    ``push`` block) and the one after it (next ``sequence`` target, the ``push`` goal zone; else the same);
    objects float32 [MAX_OBJECTS, 3]: (x, y, class) per object, class = 1 + colour * len(SHAPES) + shape,
    rows past the last object are (0, 0, 0).
    """
    k = min(state.stage, len(state.targets) - 1)
    first = state.objects[state.targets[k]].pos
    if state.family == "push":
        second = state.zones[state.goal_zone].pos
    else:
        second = state.objects[state.targets[min(k + 1, len(state.targets) - 1)]].pos
    objects = np.zeros((MAX_OBJECTS, 3), np.float32)
    colours = list(COLOURS)
    for i, o in enumerate(state.objects[:MAX_OBJECTS]):
        objects[i] = (o.pos[0], o.pos[1], 1 + colours.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape))
    return np.stack([first, second]).astype(np.float32), objects


class _Samples:
    """Per-episode sample arrays, concatenated into the training dict at the end."""

    def __init__(self, scene: bool):
        self.scene = scene
        self.images, self.states, self.instructions, self.chunks, self.cmasks = [], [], [], [], []
        self.episodes, self.fam_ids, self.landmarks, self.objects = [], [], [], []
        self.kept = 0

    def add_episode(self, images: list[np.ndarray], states: list[np.ndarray], instruction: str,
                    chunks: np.ndarray, cmask: np.ndarray, family_index: int, scene_rows: list) -> None:
        t = len(images)
        self.images.append(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))  # [T,3,H,W]: no full-size permute copy later
        self.states.append(np.stack(states))
        self.chunks.append(chunks)
        self.cmasks.append(cmask)
        self.instructions += [instruction] * t
        self.episodes.append(np.full(t, self.kept, dtype=np.int64))
        self.fam_ids.append(np.full(t, family_index, dtype=np.int64))
        if self.scene:
            self.landmarks.append(np.stack([ls for ls, _ in scene_rows]))
            self.objects.append(np.stack([ob for _, ob in scene_rows]))
        self.kept += 1

    def to_tensors(self, families: list[str], tokenizer: Tokenizer, image_dtype: torch.dtype,
                   action_dim: int, state_dim: int) -> dict:
        action_chunks = np.concatenate(self.chunks)
        action_chunks = np.concatenate(
            [action_chunks, np.zeros(action_chunks.shape[:2] + (action_dim - ACTION_DIM,), np.float32)], axis=-1)
        state = np.concatenate(self.states).astype(np.float32)
        state = np.concatenate([state, np.zeros((state.shape[0], state_dim - STATE_DIM), np.float32)], axis=-1)
        img = torch.from_numpy(np.concatenate(self.images))
        self.images = []
        if image_dtype == torch.float32:
            img = img.to(torch.float32).div_(255.0)
        tokens, token_mask = tokenizer.encode_batch(self.instructions)
        out = {
            "images": img,
            "tokens": tokens,
            "token_mask": token_mask,
            "state": torch.from_numpy(state),
            "action_chunks": torch.from_numpy(action_chunks),
            "chunk_mask": torch.from_numpy(np.concatenate(self.cmasks)),
            "episode": torch.from_numpy(np.concatenate(self.episodes)),
            "family": torch.from_numpy(np.concatenate(self.fam_ids)),
            "families": families,
            "n_episodes_kept": self.kept,
        }
        if self.scene:
            out["landmarks"] = torch.from_numpy(np.concatenate(self.landmarks))
            out["objects"] = torch.from_numpy(np.concatenate(self.objects))
        return out


def _check_widths(image_dtype: torch.dtype, action_dim: int, state_dim: int) -> None:
    if image_dtype not in (torch.float32, torch.uint8):
        raise QvlaError(f"image_dtype must be torch.float32 or torch.uint8, got {image_dtype}")
    if action_dim < ACTION_DIM or state_dim < STATE_DIM:
        raise QvlaError(f"action_dim / state_dim must be >= {ACTION_DIM} / {STATE_DIM} (the suite's), "
                        f"got {action_dim} / {state_dim}")


def collect_demonstrations(n_episodes: int | Mapping[str, int], seed: int, horizon: int,
                           families: Sequence[str] = FAMILIES, *, expert_noise: float = 0.1,
                           pad: str = "zero", only_success: bool = True,
                           image_size: int = IMAGE_SIZE, image_dtype: torch.dtype = torch.float32,
                           action_dim: int = ACTION_DIM, state_dim: int = STATE_DIM,
                           tokenizer: Tokenizer | None = None, scene: bool = False,
                           wide_push_starts: float = 0.0) -> dict:
    """Collect ``n_episodes`` expert episodes per family, episode seeds ``seed .. seed+n_episodes-1``; a mapping
    ``{family: count}`` gives families different counts (e.g. more of the hardest one).

    Returns a dict of tensors with N samples:
      images        [N,3,H,W] float32 in [0,1] (uint8 0..255 with ``image_dtype=torch.uint8``,
                    4x less memory; divide by 255 before the policy)
      tokens        int64 [N,L];  token_mask bool [N,L]
      state         float32 [N,STATE_DIM]
      action_chunks float32 [N,horizon,action_dim]
      chunk_mask    bool [N,horizon] (True = real expert action, False = padding)
      episode       int64 [N] (index of the episode in collection order)
      family        int64 [N] (index into ``families``)
    plus ``families`` (the list) and ``n_episodes_kept``; with ``scene=True`` also ``landmarks`` [N,2,2] and
    ``objects`` [N,MAX_OBJECTS,3] from :func:`scene_labels` (auxiliary targets for training).

    ``action_dim`` >= ACTION_DIM and ``state_dim`` >= STATE_DIM zero-pad the
    actions / state to a policy's widths (the env executes only the first 2
    action components); ``tokenizer`` sets the token length.
    ``wide_push_starts`` = p starts that share of the push episodes (picked by episode seed) anywhere around the
    named block (:func:`~qvla_compiler.eval.tasks.redraw_push_start`) instead of behind it: line-up and go-round
    demonstrations from the states a policy reaches when it cuts the corner.
    Use seeds disjoint from the evaluation seeds (e.g. collect from 100000).
    """
    families = list(families)
    counts = _episode_counts(n_episodes, families)
    if min(counts.values()) < 1 or horizon < 1:
        raise QvlaError(f"need n_episodes >= 1 and horizon >= 1, got {n_episodes}, {horizon}")
    if pad not in ("zero", "last"):
        raise QvlaError(f"pad must be 'zero' or 'last', got {pad!r}")
    if not 0.0 <= wide_push_starts <= 1.0:
        raise QvlaError(f"wide_push_starts is a share of the push episodes, in [0, 1]; got {wide_push_starts}")
    _check_widths(image_dtype, action_dim, state_dim)
    samples = _Samples(scene)
    for fi, family in enumerate(families):
        expert = ScriptedExpert(expert_noise, seed=int(np.random.SeedSequence([seed, fi]).generate_state(1)[0]))
        for k in range(counts[family]):
            env = TabletopEnv(family, seed + k, image_size=image_size)
            obs = env.reset()
            if family == "push" and _is_wide(seed + k, wide_push_starts):
                env.set_state(redraw_push_start(env.get_state(), seed + k))
                obs = env.observe()
            ep_images, ep_states, ep_actions, ep_scene = [], [], [], []
            done, info = False, {"success": False}
            while not done:
                state = env.get_state()
                noisy, clean = expert.act(state, return_clean=True)
                if scene:
                    ep_scene.append(scene_labels(state))
                ep_images.append(obs["image"])
                ep_states.append(obs["state"])
                ep_actions.append(clean)
                obs, done, info = env.step(noisy)
            if only_success and not info["success"]:
                continue
            T = len(ep_actions)
            acts = np.stack(ep_actions).astype(np.float32)            # [T, A]
            fill = acts[-1] if pad == "last" else np.zeros(ACTION_DIM, np.float32)
            padded = np.concatenate([acts, np.repeat(fill[None], horizon - 1, axis=0)], axis=0)
            idx = np.arange(T)[:, None] + np.arange(horizon)[None, :]  # [T, H]
            samples.add_episode(ep_images, ep_states, env.instruction, padded[idx], idx < T, fi, ep_scene)
    if samples.kept == 0:
        raise QvlaError("no successful expert episode was collected; lower expert_noise or pass only_success=False")
    return samples.to_tensors(families, tokenizer or default_tokenizer(), image_dtype, action_dim, state_dim)


def _is_wide(episode_seed: int, share: float) -> bool:
    # drawn per episode seed, so the data-parallel workers' seed ranges each get their share
    return share > 0.0 and np.random.default_rng([episode_seed, 15485863]).random() < share


def _episode_counts(n_episodes: int | Mapping[str, int], families: list[str]) -> dict[str, int]:
    if not isinstance(n_episodes, Mapping):
        return {f: int(n_episodes) for f in families}
    if set(n_episodes) != set(families):
        raise QvlaError(f"per-family episode counts must name exactly the families {families}, "
                        f"got {sorted(n_episodes)}")
    return {f: int(n_episodes[f]) for f in families}


def expert_chunk(scratch: TabletopEnv, state: TabletopState, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """The noise-free expert's next ``horizon`` actions from ``state`` ([horizon, ACTION_DIM], zero after the
    task is solved) and the mask of real entries, planned on ``scratch`` (an env of the same family; not rendered).
    The step limit is ignored: a label should not tell the policy to stand still because time is nearly up."""
    unlimited = state.copy()
    unlimited.max_steps = state.t + horizon + 1
    scratch.set_state(unlimited)
    acts = np.zeros((horizon, ACTION_DIM), np.float32)
    mask = np.zeros(horizon, bool)
    for k in range(horizon):
        if scratch.done:
            break
        acts[k] = _PLANNER.clean_action(scratch.state)
        mask[k] = True
        scratch.advance(acts[k])
    return acts, mask


def collect_corrections(policy_fn: Callable, n_episodes: int, seed: int, horizon: int,
                        families: Sequence[str] = FAMILIES, *, n_exec: int, noise_seed: int = 0,
                        image_size: int = IMAGE_SIZE, image_dtype: torch.dtype = torch.float32,
                        action_dim: int = ACTION_DIM, state_dim: int = STATE_DIM,
                        tokenizer: Tokenizer | None = None, scene: bool = False, every: int = 1) -> dict:
    """DAgger: run the chunked ``policy_fn`` (as :func:`~qvla_compiler.eval.runner.run_episodes` does) on
    ``n_episodes`` episodes per family (seeds ``seed ..``) and record every state it visits, labelled with
    :func:`expert_chunk` from that state.  Failed episodes are kept: their states are the point.  Returns the
    same dict as :func:`collect_demonstrations` (plus ``policy_success``: the fraction of episodes the policy
    solved); ``horizon`` is both the policy's chunk length and the labels'.  ``every`` = k records only every
    k-th step (k = ``n_exec``: just the states where the policy is asked for a chunk).
    """
    from qvla_compiler.eval.runner import run_episodes

    if n_episodes < 1 or horizon < 1 or every < 1:
        raise QvlaError(f"need n_episodes, horizon and every >= 1, got {n_episodes}, {horizon}, {every}")
    _check_widths(image_dtype, action_dim, state_dim)
    tokenizer = tokenizer or default_tokenizer()
    families = list(families)
    samples, solved = _Samples(scene), 0
    for fi, family in enumerate(families):
        scratch = TabletopEnv(family, seed, image_size=image_size)
        visited: dict[int, list] = {}

        def record(i: int, env: TabletopEnv, obs: dict) -> None:
            if env.state.t % every:
                return
            state = env.state  # read only: expert_chunk plans on its own copy
            chunk, mask = expert_chunk(scratch, state, horizon)
            visited.setdefault(i, []).append((obs["image"], obs["state"], chunk, mask,
                                              scene_labels(state) if scene else None))

        seeds = range(seed, seed + n_episodes)
        results = run_episodes(family, seeds, policy_fn, n_exec, noise_seed, horizon=horizon,
                               action_dim=action_dim, state_dim=state_dim, tokenizer=tokenizer,
                               image_size=image_size, on_step=record)
        for i, res in enumerate(results):
            solved += res.success
            rows = visited.get(i)
            if not rows:
                continue
            samples.add_episode([r[0] for r in rows], [r[1] for r in rows], res.instruction,
                                np.stack([r[2] for r in rows]), np.stack([r[3] for r in rows]), fi,
                                [r[4] for r in rows])
    out = samples.to_tensors(families, tokenizer, image_dtype, action_dim, state_dim)
    out["policy_success"] = solved / (n_episodes * len(families))
    return out
