"""Expert demonstrations as action-chunk samples for flow-matching training.

One sample per step of every expert episode: the observation at step t and
the chunk of the expert's actions a_t .. a_{t+horizon-1}.  Past the end of the
episode the chunk is padded with zeros (``pad="zero"``: stand still, the task
is done) or by repeating the last action (``pad="last"``); ``chunk_mask``
marks the real (unpadded) entries.

The expert executes a noisy action (``expert_noise``) for state diversity,
while the recorded label is its noise-free action at the visited state.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.expert import ScriptedExpert
from qvla_compiler.eval.tabletop import (
    ACTION_DIM, COLOURS, FAMILIES, IMAGE_SIZE, SHAPES, STATE_DIM, TabletopEnv, TabletopState,
)
from qvla_compiler.eval.tokenizer import Tokenizer, default_tokenizer

__all__ = ["collect_demonstrations", "scene_labels", "MAX_OBJECTS"]

MAX_OBJECTS = 4


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


def collect_demonstrations(n_episodes: int, seed: int, horizon: int,
                           families: Sequence[str] = FAMILIES, *, expert_noise: float = 0.1,
                           pad: str = "zero", only_success: bool = True,
                           image_size: int = IMAGE_SIZE, image_dtype: torch.dtype = torch.float32,
                           action_dim: int = ACTION_DIM, state_dim: int = STATE_DIM,
                           tokenizer: Tokenizer | None = None, scene: bool = False) -> dict:
    """Collect ``n_episodes`` expert episodes per family, episode seeds ``seed .. seed+n_episodes-1``.

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
    Use seeds disjoint from the evaluation seeds (e.g. collect from 100000).
    """
    if n_episodes < 1 or horizon < 1:
        raise QvlaError(f"need n_episodes >= 1 and horizon >= 1, got {n_episodes}, {horizon}")
    if pad not in ("zero", "last"):
        raise QvlaError(f"pad must be 'zero' or 'last', got {pad!r}")
    if image_dtype not in (torch.float32, torch.uint8):
        raise QvlaError(f"image_dtype must be torch.float32 or torch.uint8, got {image_dtype}")
    if action_dim < ACTION_DIM or state_dim < STATE_DIM:
        raise QvlaError(f"action_dim / state_dim must be >= {ACTION_DIM} / {STATE_DIM} (the suite's), "
                        f"got {action_dim} / {state_dim}")
    tokenizer = tokenizer or default_tokenizer()
    families = list(families)
    images, states, instructions, chunks, cmasks, episodes, fam_ids = [], [], [], [], [], [], []
    landmarks, objects = [], []
    kept = 0
    for fi, family in enumerate(families):
        expert = ScriptedExpert(expert_noise, seed=int(np.random.SeedSequence([seed, fi]).generate_state(1)[0]))
        for k in range(n_episodes):
            env = TabletopEnv(family, seed + k, image_size=image_size)
            obs = env.reset()
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
            chunks.append(padded[idx])
            cmasks.append(idx < T)
            images.append(np.ascontiguousarray(np.stack(ep_images).transpose(0, 3, 1, 2)))  # [T,3,H,W] now: no full-size permute copy later
            states.append(np.stack(ep_states))
            instructions += [env.instruction] * T
            episodes.append(np.full(T, kept, dtype=np.int64))
            fam_ids.append(np.full(T, fi, dtype=np.int64))
            if scene:
                landmarks.append(np.stack([ls for ls, _ in ep_scene]))
                objects.append(np.stack([ob for _, ob in ep_scene]))
            kept += 1
    if kept == 0:
        raise QvlaError("no successful expert episode was collected; lower expert_noise or pass only_success=False")
    action_chunks = np.concatenate(chunks)
    action_chunks = np.concatenate(
        [action_chunks, np.zeros(action_chunks.shape[:2] + (action_dim - ACTION_DIM,), np.float32)], axis=-1)
    state = np.concatenate(states).astype(np.float32)
    state = np.concatenate([state, np.zeros((state.shape[0], state_dim - STATE_DIM), np.float32)], axis=-1)
    img = torch.from_numpy(np.concatenate(images))
    del images
    if image_dtype == torch.float32:
        img = img.to(torch.float32).div_(255.0)
    tokens, token_mask = tokenizer.encode_batch(instructions)
    out = {
        "images": img,
        "tokens": tokens,
        "token_mask": token_mask,
        "state": torch.from_numpy(state),
        "action_chunks": torch.from_numpy(action_chunks),
        "chunk_mask": torch.from_numpy(np.concatenate(cmasks)),
        "episode": torch.from_numpy(np.concatenate(episodes)),
        "family": torch.from_numpy(np.concatenate(fam_ids)),
        "families": families,
        "n_episodes_kept": kept,
    }
    if scene:
        out["landmarks"] = torch.from_numpy(np.concatenate(landmarks))
        out["objects"] = torch.from_numpy(np.concatenate(objects))
    return out
