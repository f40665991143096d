"""LIBERO observation → lerobot policy input → actions: the suite's side of the policy interface.

A lerobot policy folder (a real checkpoint, or `tiny.write_tiny_libero_policy`) is loaded with lerobot's own
pre/post-processors, and every policy call takes the path lerobot's `lerobot-eval` takes on LIBERO:
frames + robot state as lerobot's `LiberoEnv` lays them out → `envs.utils.preprocess_observation` →
`LiberoProcessorStep` (images rotated 180°, state = eef xyz + axis-angle + gripper qpos, 8-D) → the policy's
preprocessor (normalisation, tokenised instruction; π0.5 also puts the discretised state in the prompt) → the qvla
observation (`wrap(policy).from_lerobot_batch`) → an action chunk [chunk, max_action_dim] from the float sampler or
the quantized program with the SAME noise → the first `action_dim` columns → the postprocessor (unnormalisation) →
[chunk, 7] actions in LIBERO's units. Cameras: lerobot's LIBERO keys `observation.images.image` (agentview) and
`image2` (wrist); a policy with other camera names gets agentview for its first camera and the wrist for its second
unless `camera_map` says otherwise; each camera renders at the size of its policy input feature.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.libero.env import ACTION_DIM, CAMERAS, LiberoObservation

__all__ = ["LiberoPolicyError", "LiberoPolicy", "load_libero_policy", "STATE_DIM"]

STATE_DIM = 8  # lerobot's LiberoProcessorStep: eef pos (3), axis-angle (3), gripper qpos (2)
_IMAGES = "observation.images."


class LiberoPolicyError(QvlaError, ValueError):
    """A policy folder that cannot drive LIBERO (missing processors, a camera, state or action that does not fit)."""


def _default_camera_map(cameras: tuple[str, ...]) -> dict[str, str]:
    libero_keys = {_IMAGES + k: cam for k, cam in CAMERAS.items()}
    if set(cameras) <= set(libero_keys):
        return {c: libero_keys[c] for c in cameras}
    if len(cameras) > 2:
        raise LiberoPolicyError(f"the policy has {len(cameras)} cameras {list(cameras)}; LIBERO has two "
                                "(agentview, robot0_eye_in_hand): pass camera_map={policy camera: LIBERO camera}")
    return dict(zip(cameras, ("agentview", "robot0_eye_in_hand")))


class LiberoPolicy:
    """A wrapped lerobot policy with its processors, mapped onto LIBERO (see the module docstring).

    `wrapped` is `qvla_compiler.integrations.lerobot.wrap(policy)`; `preprocessor` / `postprocessor` are lerobot's
    pipelines for it. `n_action_steps` (default: the policy config's) actions of every chunk are executed.
    """

    def __init__(self, wrapped, preprocessor, postprocessor, *, n_action_steps: int | None = None,
                 camera_map: dict[str, str] | None = None, source: str = ""):
        self.wrapped, self.pre, self.post, self.source = wrapped, preprocessor, postprocessor, source
        cfg = wrapped.policy.config
        self.camera_map = dict(camera_map) if camera_map else _default_camera_map(wrapped.cameras)
        bad = {k: v for k, v in self.camera_map.items() if k not in wrapped.cameras or v not in CAMERAS.values()}
        missing = [c for c in wrapped.cameras if c not in self.camera_map]
        if bad or missing:
            raise LiberoPolicyError(f"camera_map {self.camera_map} does not fit: policy cameras "
                                    f"{list(wrapped.cameras)}, LIBERO cameras {sorted(CAMERAS.values())}")
        self.render_sizes = {cam: tuple(int(x) for x in cfg.image_features[key].shape[1:])
                             for key, cam in self.camera_map.items()}
        if wrapped.action_dim != ACTION_DIM:
            raise LiberoPolicyError(f"the policy's action feature has {wrapped.action_dim} dims; LIBERO takes "
                                    f"{ACTION_DIM} (xyz delta, axis-angle delta, gripper): use a LIBERO checkpoint")
        state = cfg.robot_state_feature
        if state is not None and tuple(state.shape) != (STATE_DIM,):
            raise LiberoPolicyError(f"the policy's observation.state is {tuple(state.shape)}; lerobot's LIBERO state "
                                    f"is ({STATE_DIM},): eef xyz, axis-angle, gripper qpos")
        self.horizon, self.noise_dim = wrapped.horizon, wrapped.noise_dim
        steps = cfg.n_action_steps if n_action_steps is None else int(n_action_steps)
        if not 1 <= steps <= self.horizon:
            raise LiberoPolicyError(f"n_action_steps must be in 1..{self.horizon} (the policy's chunk), got {steps}")
        self.n_action_steps = steps
        from qvla_compiler.integrations.lerobot import _import

        self._preprocess_observation = _import("lerobot.envs.utils").preprocess_observation
        self._env_step = _import("lerobot.processor").LiberoProcessorStep()

    def observation(self, frames: dict[str, np.ndarray], obs: LiberoObservation, instruction: str) -> dict:
        """One LIBERO observation as the qvla observation dict (images, tokens, token_mask, state), batch 1."""
        raw = {"pixels": {k.removeprefix(_IMAGES): frames[cam][None] for k, cam in self.camera_map.items()},
               "robot_state": {"eef": {"pos": obs.eef_pos[None], "quat": obs.eef_quat[None],
                                       "mat": obs.eef_mat[None]},
                               "gripper": {"qpos": obs.gripper_qpos[None], "qvel": obs.gripper_qvel[None]},
                               "joints": {"pos": obs.joint_pos[None], "vel": obs.joint_vel[None]}}}
        batch = self._preprocess_observation(raw)
        batch = self._env_step._process_observation(batch)  # LiberoProcessorStep: 180° images, 8-D state
        batch["task"] = [instruction]
        with torch.no_grad():
            batch = self.pre(batch)
        return self.wrapped.from_lerobot_batch(batch)

    def noise(self, seed_words: tuple[int, ...]) -> torch.Tensor:
        """Standard-normal noise [1, horizon, max_action_dim] determined by `seed_words` alone."""
        ss = np.random.SeedSequence([int(w) for w in seed_words])
        gen = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0]))
        return torch.randn(1, self.horizon, self.noise_dim, generator=gen)

    def float_actions(self, obs: dict, noise: torch.Tensor) -> torch.Tensor:
        """lerobot's own sampler (the float reference), [1, horizon, max_action_dim]."""
        with torch.no_grad():
            return self.wrapped.sample_actions(obs["images"], obs["tokens"], obs["token_mask"], obs["state"],
                                               noise=noise)

    @staticmethod
    def program_actions(module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
        """The quantized program's sampler, called like `float_actions`."""
        def act(obs: dict, noise: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(obs["images"], obs["tokens"], obs["token_mask"], obs["state"], noise)
        return act

    def to_env(self, actions: torch.Tensor) -> np.ndarray:
        """[1, horizon, max_action_dim] model actions → [horizon, 7] LIBERO actions (lerobot's postprocessor)."""
        with torch.no_grad():
            out = self.post(self.wrapped.to_lerobot_actions(actions))
        return out[0].to(torch.float64).numpy()

    def calibration_batches(self, observations: list[dict], batch: int = 2) -> list[dict]:
        """Observation dicts (batch 1 each) stacked into calibration batches of `batch` rows."""
        groups = [observations[i:i + batch] for i in range(0, len(observations), batch)]
        return [{k: torch.cat([o[k] for o in g]) for k in g[0]} for g in groups if len(g) == batch]


def load_libero_policy(path: str | os.PathLike, *, n_action_steps: int | None = None,
                       camera_map: dict[str, str] | None = None) -> LiberoPolicy:
    """Load a lerobot policy folder (config.json, model.safetensors, policy_{pre,post}processor.json) offline."""
    from qvla_compiler.eval.libero.tiny import tiny_kind
    from qvla_compiler.integrations.lerobot import _import, load_pretrained

    folder = Path(path)
    for name in ("config.json", "policy_preprocessor.json", "policy_postprocessor.json"):
        if not (folder / name).is_file():
            raise LiberoPolicyError(
                f"{folder} has no {name}; a LIBERO policy folder holds lerobot's save_pretrained output and its "
                "processors (preprocessor.save_pretrained(dir), postprocessor.save_pretrained(dir)), as lerobot's hub "
                "checkpoints do (e.g. `huggingface-cli download lerobot/pi05_libero --local-dir DIR`)")
    kind = tiny_kind(folder)
    with contextlib.redirect_stdout(sys.stderr):
        if kind is not None:
            from qvla_compiler.integrations.lerobot_tiny import tiny_sizes

            with tiny_sizes(kind):
                wrapped = load_pretrained(folder)
        else:
            wrapped = load_pretrained(folder)
        overrides = {"device_processor": {"device": "cpu"}}
        if (folder / "tokenizer").is_dir():  # a tokenizer shipped in the folder (the tiny one) wins over the hub's
            overrides["tokenizer_processor"] = {"tokenizer_name": str(folder / "tokenizer")}
        factory = _import("lerobot.policies.factory")
        pre, post = factory.make_pre_post_processors(wrapped.policy.config, pretrained_path=str(folder),
                                                     preprocessor_overrides=overrides,
                                                     postprocessor_overrides={"device_processor": {"device": "cpu"}})
    return LiberoPolicy(wrapped, pre, post, n_action_steps=n_action_steps, camera_map=camera_map,
                        source=str(folder))
