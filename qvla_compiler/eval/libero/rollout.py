"""Paired LIBERO rollouts: the float and the quantized policy from the same init state with the same noise.

One episode pair = (suite, task, episode). The float policy runs its closed loop; at each of its policy calls the
quantized policy also acts on the very same observation with the very same noise, which gives the per-chunk action
divergence (pure quantization error, no compounding). Then the quantized policy runs its own closed loop from the same
init state, with the noise of its k-th call equal to the float policy's k-th. The two end-effector trajectories give
the trajectory divergence and the step where they separate (first step farther apart than `separation_m`).
Noise of call k of an episode depends only on (noise_seed, suite, task, episode, k): not on workers or batching.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from qvla_compiler.eval.libero.env import LiberoTaskEnv

__all__ = ["Rollout", "EpisodePair", "run_rollout", "run_pair", "noise_words", "chunk_divergence",
           "trajectory_divergence"]

Act = Callable[[dict, torch.Tensor], torch.Tensor]


def noise_words(noise_seed: int, suite: str, task_id: int, episode: int, call: int) -> tuple[int, ...]:
    return (int(noise_seed), zlib.crc32(suite.encode()), int(task_id), int(episode), int(call), 7919)


@dataclass
class Rollout:
    success: bool
    steps: int
    calls: int
    eef: np.ndarray                     # [steps + 1, 3] end-effector positions, from the settled start
    actions: np.ndarray                 # [calls, horizon, 7] chunks in LIBERO units (all rows, executed or not)
    seconds: float
    frames: list[np.ndarray] | None = None   # agentview frames (top row first) when recorded

    @property
    def digest(self) -> str:
        """sha256 (first 16 hex) of the trajectory and the action chunks: equal digests = bit-identical rollouts."""
        import hashlib

        return hashlib.sha256(self.eef.tobytes() + self.actions.tobytes()).hexdigest()[:16]


def run_rollout(env: LiberoTaskEnv, policy, act: Act, episode: int, noise_seed: int, *, shadow: Act | None = None,
                frame_every: int | None = None) -> tuple[Rollout, list[dict]]:
    """One closed-loop episode of `act`. With `shadow`, also returns per-chunk divergence of shadow vs act on the
    same observations and noise. `frame_every=k` records an agentview frame every k steps (and renders for it)."""
    t0 = time.perf_counter()
    obs = env.reset(episode)
    eef, chunks, shadow_stats = [obs.eef_pos], [], []
    frames = [] if frame_every else None
    done, success, calls = False, False, 0
    while not done:
        frame_set = env.frames()
        if frames is not None:
            frames.append(_upright(frame_set["agentview"]))
        inp = policy.observation(frame_set, obs, env.instruction)
        noise = policy.noise(noise_words(noise_seed, env.suite, env.task_id, episode, calls))
        chunk = policy.to_env(act(inp, noise))
        if shadow is not None:
            shadow_stats.append(chunk_divergence(chunk, policy.to_env(shadow(inp, noise))))
        chunks.append(chunk)
        calls += 1
        n = policy.n_action_steps
        for k in range(n):
            last = k == n - 1
            capture = last or (frame_every is not None and (env.steps + 1) % frame_every == 0)
            obs, success, done = env.step(chunk[k], capture=capture)
            eef.append(obs.eef_pos)
            if done:
                break
            if capture and not last and frames is not None:
                frames.append(_upright(env.frames()["agentview"]))
    return Rollout(bool(success), env.steps, calls, np.stack(eef), np.stack(chunks), time.perf_counter() - t0,
                   frames), shadow_stats


def _upright(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(frame[::-1])  # robosuite's frames are bottom row first (OpenGL)


def chunk_divergence(a: np.ndarray, b: np.ndarray) -> dict:
    """L2 distance, relative L2 (to ||a||) and cosine similarity of two action chunks."""
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    diff = float(np.linalg.norm(a64 - b64))
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    cos = 1.0 if diff == 0.0 else float(a64 @ b64 / (na * nb)) if na and nb else 0.0
    return {"l2": diff, "rel_l2": diff / na if na else float(diff != 0.0), "cos": cos}


def trajectory_divergence(a: np.ndarray, b: np.ndarray, separation_m: float) -> dict:
    """Per-step distance of two end-effector trajectories (the shorter holds its last position: its episode ended)."""
    n = max(len(a), len(b))
    pa = np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])
    pb = np.concatenate([b, np.repeat(b[-1:], n - len(b), axis=0)])
    dist = np.linalg.norm(pa - pb, axis=1)
    apart = np.nonzero(dist > separation_m)[0]
    return {"ee_mean_m": float(dist.mean()), "ee_max_m": float(dist.max()), "ee_final_m": float(dist[-1]),
            "separation_step": int(apart[0]) if len(apart) else None}


@dataclass
class EpisodePair:
    suite: str
    task_id: int
    task: str
    episode: int
    fp: Rollout
    q: Rollout
    chunks: list[dict] = field(default_factory=list)   # per float call: divergence of the quantized chunk
    trajectory: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, int]:
        return self.suite, self.task_id, self.episode

    def to_json(self) -> dict:
        def mean(k):
            return float(np.mean([c[k] for c in self.chunks])) if self.chunks else 0.0

        return {"suite": self.suite, "task_id": self.task_id, "task": self.task, "episode": self.episode,
                "success_fp": self.fp.success, "success_q": self.q.success, "steps_fp": self.fp.steps,
                "steps_q": self.q.steps, "calls_fp": self.fp.calls, "calls_q": self.q.calls,
                "action_l2": mean("l2"), "action_rel_l2": mean("rel_l2"), "action_cos": mean("cos"),
                "action_l2_max": max((c["l2"] for c in self.chunks), default=0.0), **self.trajectory,
                "digest_fp": self.fp.digest, "digest_q": self.q.digest,
                "seconds_fp": round(self.fp.seconds, 2), "seconds_q": round(self.q.seconds, 2)}


def run_pair(env: LiberoTaskEnv, policy, act_fp: Act, act_q: Act | None, episode: int, noise_seed: int,
             separation_m: float = 0.01, frame_every: int | None = None) -> EpisodePair:
    """Float rollout (with the quantized policy shadowing it), then the quantized rollout; `act_q=None` means the
    quantized policy IS the float one (recipe "float": the second rollout is the first)."""
    fp, chunks = run_rollout(env, policy, act_fp, episode, noise_seed, shadow=act_q, frame_every=frame_every)
    if act_q is None:
        q, chunks = fp, [chunk_divergence(c, c) for c in fp.actions]
    else:
        q, _ = run_rollout(env, policy, act_q, episode, noise_seed, frame_every=frame_every)
    return EpisodePair(env.suite, env.task_id, env.name, int(episode), fp, q, chunks,
                       trajectory_divergence(fp.eef, q.eef, separation_m))
