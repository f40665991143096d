"""Episode runners for the tabletop suite (:mod:`qvla_compiler.eval.tabletop`).

Policies are chunked: ``policy_fn(batch) -> actions [B, horizon, ACTION_DIM]``
with ``batch = {"images": float [B,3,H,W] in [0,1], "tokens": int64 [B,L],
"token_mask": bool [B,L], "state": float [B,STATE_DIM]}`` (plus ``"noise"``
[B, horizon, ACTION_DIM] when the runner is given a ``noise_seed``); the
runners execute the first ``n_exec`` actions of every chunk.  For a policy
whose widths exceed the suite's use ``run_episodes(..., **runner_kwargs(policy.config))``:
the state is zero-padded, only the first 2 action components are executed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.tabletop import TabletopEnv
from qvla_compiler.eval.tasks import (
    _FAMILY_INDEX, ACTION_DIM, IMAGE_SIZE, STATE_DIM, _check_family, _check_seed,
)

__all__ = [
    "EpisodeResult", "obs_to_batch", "episode_noise", "run_episode", "run_episodes",
    "sample_actions_policy", "runner_kwargs",
]


StepHook = Callable[[int, TabletopEnv, dict], None]


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
              device, on_step: StepHook | None = None) -> list[EpisodeResult]:
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
                    if on_step is not None:
                        on_step(i, envs[i], obs[i])
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
                 device=None, on_step: StepHook | None = None) -> list[EpisodeResult]:
    """Run many episodes in lockstep, batching the policy calls across episodes.

    ``families`` is one family for all seeds or one per seed.  With
    ``noise_seed`` each call gets ``batch["noise"]`` [B, horizon, action_dim]
    from :func:`episode_noise` (requires ``horizon``), so results do not depend
    on batching.  ``state_dim`` zero-pads the state; ``tokenizer`` sets the
    token length; only the first 2 action components are executed.  Finished
    episodes drop out of the batch; ``fixed_batch=True`` instead pads every
    call to the same batch size (``max_batch`` or the number of episodes) by
    repeating an active episode (static-shape compiled programs).  ``on_step(i, env, obs)``
    is called before every env step of episode ``i`` with the observation the
    step acts on (e.g. to record the states a policy visits).
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
                     record_frames, fixed_batch, max_batch, device, on_step)
