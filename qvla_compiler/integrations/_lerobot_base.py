"""The shared base of the lerobot adapters: the error classes, `_import` (with its torchvision shim), the
`LerobotAdapter` base class, the DynamicCache ↔ tuple helpers and the install constants.

The adapter modules (`_lerobot_pi`, `_lerobot_smolvla`, `lerobot_groot`, `lerobot_tiny`) import from here;
`qvla_compiler.integrations.lerobot` (the `wrap` dispatcher) imports them lazily and re-exports the public names, so
the dependency only points one way: lerobot → adapters → _lerobot_base. Importing this module needs only torch.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvla_compiler.errors import QvlaError
from qvla_compiler.models.sampling import FlowSchedule

if TYPE_CHECKING:
    from qvla_compiler.recipes import QuantRecipe

INSTALL_COMMAND = "bash scripts/install_lerobot.sh"
INSTALL_HINT = (f"install it with `{INSTALL_COMMAND}` from the qvla_compiler repository (lerobot 0.6.1 + "
                "transformers 5.5.4, --no-deps next to the installed torch, about 1–2 minutes)")
OBS_KEYS = ("images", "tokens", "token_mask", "state")
LANG_TOKENS = "observation.language.tokens"
LANG_MASK = "observation.language.attention_mask"
STATE = "observation.state"


class LerobotNotInstalledError(QvlaError, ImportError):
    """lerobot (or a package it needs) cannot be imported."""


class UnsupportedLerobotPolicyError(QvlaError, TypeError):
    """`wrap` was given an object that is not one of the lerobot policies it knows."""


class LerobotObservationError(QvlaError, ValueError):
    """An observation batch does not fit the wrapped policy (a missing camera, a wrong shape)."""


# --------------------------------------------------------------------------------------------------- importing
_TV_SHIM: Any = None  # keeps the torchvision op-schema library alive for the process


def _torchvision_shim() -> None:
    """PyPI's torchvision wheel links CUDA libraries; with a CPU-only torch its extension does not load and
    `import torchvision` dies registering fake kernels for ops that were never defined (torchvision::nms). Define
    those two schemas (no kernels: no VLA path calls them) only when the extension really cannot load."""
    global _TV_SHIM
    if _TV_SHIM is not None or "torchvision" in __import__("sys").modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for lib in glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return  # a working extension defines the ops itself
        except OSError:
            pass
    try:
        torch.ops.torchvision.nms  # noqa: B018 — defined already (another shim)
        return
    except (AttributeError, RuntimeError):
        pass
    _TV_SHIM = torch.library.Library("torchvision", "DEF")
    _TV_SHIM.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_SHIM.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _import(module: str):
    """Import a lerobot module, with a QvlaError that says how to install lerobot when it cannot."""
    _torchvision_shim()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise LerobotNotInstalledError(
            f"cannot import {module} ({type(exc).__name__}: {exc}); missing: {missing}. lerobot is needed for "
            f"qvla_compiler.integrations.lerobot: {INSTALL_HINT}") from exc
    except SyntaxError as exc:
        raise LerobotNotInstalledError(
            f"cannot import {module}: {exc.filename}:{exc.lineno} is Python 3.12 syntax (lerobot >= 0.5 declares "
            "Python >= 3.12); rewrite it with `python scripts/patch_lerobot_py311.py` or reinstall with "
            f"`{INSTALL_COMMAND}`") from exc


# ---------------------------------------------------------------------------------------------------- adapters
class LerobotAdapter(nn.Module):
    """Shared part of the adapters: observation mapping, schedule, example / calibration data.

    Subclasses set `_prefix(images_list, img_masks, tokens, token_mask, state) -> tuple` and
    `_denoise(prefix, x_t, t) -> Tensor` and `_sample(images_list, img_masks, tokens, token_mask, state, noise)`.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy.eval()
        self.model = self._core(policy)
        cfg = policy.config
        rtc = getattr(cfg, "rtc_config", None)
        if rtc is not None and getattr(rtc, "enabled", False):
            raise LerobotObservationError(
                f"{type(policy).__name__} has real-time chunking enabled (config.rtc_config.enabled): its guidance "
                "changes every Euler step with the previous chunk, which a captured denoise step does not see; set "
                "config.rtc_config.enabled=False to quantize it")
        self.cameras = tuple(k for k in cfg.image_features if ".empty_camera_" not in k)
        if not self.cameras:
            raise LerobotObservationError(f"{type(policy).__name__} has no camera in config.image_features; give "
                                          "its config at least one VISUAL input feature")
        shapes = {tuple(cfg.image_features[k].shape) for k in self.cameras}
        if len(shapes) != 1:
            raise LerobotObservationError(f"the cameras {list(self.cameras)} have different shapes {sorted(shapes)}; "
                                          "images are stacked into one [B, n_cams, 3, H, W] tensor, so give every "
                                          "camera the same (3, H, W) in config.input_features")
        self.image_shape = shapes.pop()
        self.state_dim = cfg.robot_state_feature.shape[0] if cfg.robot_state_feature else cfg.max_state_dim
        self.action_dim = cfg.action_feature.shape[0] if cfg.action_feature else cfg.max_action_dim
        self.horizon, self.noise_dim = cfg.chunk_size, cfg.max_action_dim
        steps = self.num_steps
        dt = -1.0 / steps  # lerobot's euler_integrate, float for float
        self.schedule = FlowSchedule(timesteps=tuple(1.0 + k * dt for k in range(steps)), dt=dt)

    # ---- members subclasses define
    num_steps: int
    max_tokens: int
    vocab_size: int
    # (module-path prefix, role / region) pairs for linears the graph-structure analysis cannot place, and
    # module-path prefixes QuantVLA keeps float although the layout would quantize them
    role_overrides: tuple[tuple[str, str], ...] = ()
    region_overrides: tuple[tuple[str, str], ...] = ()
    skip: tuple[str, ...] = ()

    def recipe(self, recipe: "str | QuantRecipe" = "quantvla-w8a8", layout: str | None = None) -> "QuantRecipe":
        """`recipe` (a preset name or QuantRecipe) with this policy's overrides added (the caller's own win); pass
        it to quantize. Nothing is added for pi0 / pi0.5 / SmolVLA; GR00T keeps its VL self-attention float (see
        lerobot_groot)."""
        import dataclasses

        from qvla_compiler.recipes import resolve_recipe

        base = resolve_recipe(recipe, layout)
        roles = tuple(o for o in self.role_overrides if o[0] not in {p for p, _ in base.role_overrides})
        regions = tuple(o for o in self.region_overrides if o[0] not in {p for p, _ in base.region_overrides})
        skip = tuple(p for p in self.skip if p not in base.skip)
        if not (roles or regions or skip):
            return base
        return dataclasses.replace(base, role_overrides=base.role_overrides + roles,
                                   region_overrides=base.region_overrides + regions, skip=base.skip + skip)

    def _preprocess(self, batch: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        raise NotImplementedError

    @staticmethod
    def _core(policy: nn.Module) -> nn.Module:
        return policy.model  # lerobot's inner flow-matching model (PI05Pytorch, VLAFlowMatching, …)

    # ---- observation mapping
    def to_lerobot_batch(self, images: Tensor, tokens: Tensor, token_mask: Tensor, state: Tensor) -> dict[str, Tensor]:
        """qvla observation → lerobot batch dict (one entry per camera; views, no copies)."""
        if images.dim() != 5 or images.shape[1] != len(self.cameras):
            raise LerobotObservationError(
                f"images must be [B, {len(self.cameras)}, 3, H, W] (cameras {list(self.cameras)}), got "
                f"{list(images.shape)}; build it with from_lerobot_batch(batch)")
        batch = {cam: images[:, i] for i, cam in enumerate(self.cameras)}
        batch.update({LANG_TOKENS: tokens, LANG_MASK: token_mask, STATE: state})
        return batch

    def from_lerobot_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """lerobot batch dict (after its processor: tokens present, images in [0, 1]) → qvla observation dict."""
        missing = [k for k in (*self.cameras, LANG_TOKENS, LANG_MASK) if k not in batch]
        if missing:
            raise LerobotObservationError(f"the batch lacks {missing}; run lerobot's preprocessor (it tokenizes the "
                                          "task) and give every camera of config.image_features")
        tokens = batch[LANG_TOKENS]
        state = batch.get(STATE)
        if state is None:
            state = tokens.new_zeros(tokens.shape[0], self.state_dim, dtype=torch.float32)
        return {"images": torch.stack([batch[c] for c in self.cameras], dim=1), "tokens": tokens,
                "token_mask": batch[LANG_MASK].bool(), "state": state}

    def to_lerobot_actions(self, actions: Tensor) -> Tensor:
        """[B, chunk, max_action_dim] → [B, chunk, action_dim], as lerobot's predict_action_chunk returns them."""
        return actions[:, :, : self.action_dim]

    def _lists(self, images, tokens, token_mask, state):
        batch = self.to_lerobot_batch(images, tokens, token_mask, state)
        imgs, img_masks = self._preprocess(batch)
        return imgs, img_masks, tokens, token_mask, batch

    # ---- the VLAPolicy protocol
    def embed_prefix(self, images: Tensor, tokens: Tensor, token_mask: Tensor, state: Tensor) -> tuple[Tensor, ...]:
        return self._prefix(*self._lists(images, tokens, token_mask, state))

    def denoise_step(self, prefix: tuple[Tensor, ...], x_t: Tensor, t: Tensor) -> Tensor:
        return self._denoise(tuple(prefix), x_t, t)

    @torch.no_grad()
    def sample_actions(self, images: Tensor, tokens: Tensor, token_mask: Tensor, state: Tensor, *,
                       noise: Tensor) -> Tensor:
        """lerobot's own `model.sample_actions` on the same preprocessed inputs (the float reference)."""
        return self._sample(*self._lists(images, tokens, token_mask, state), noise)

    def example_noise(self, batch: int = 2, seed: int = 0) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.horizon, self.noise_dim, generator=gen)

    def example_inputs(self, batch: int = 2) -> dict[str, Tensor]:
        return self._observation(torch.Generator().manual_seed(1234), batch)

    def calibration_batches(self, n: int, seed: int = 0, batch: int = 2) -> Iterator[dict[str, Tensor]]:
        """`n` random but valid observations: smooth images in [0, 1], right-padded token ids in [1, vocab) with
        random lengths, state in [-1, 1]. For real checkpoints prefer real observations (from_lerobot_batch)."""
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            yield self._observation(gen, batch)

    def _observation(self, gen: torch.Generator, batch: int) -> dict[str, Tensor]:
        c, h, w = self.image_shape
        n = len(self.cameras)
        coarse = torch.rand(batch * n, c, 4, 4, generator=gen)
        images = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        images = (images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0.0, 1.0).view(batch, n, c, h, w)
        lengths = torch.randint(1, self.max_tokens + 1, (batch,), generator=gen)
        token_mask = torch.arange(self.max_tokens)[None, :] < lengths[:, None]
        tokens = torch.randint(1, self.vocab_size, (batch, self.max_tokens), generator=gen) * token_mask
        state = (0.5 * torch.randn(batch, self.state_dim, generator=gen)).clamp(-1.0, 1.0)
        return {"images": images, "tokens": tokens, "token_mask": token_mask, "state": state}

    def forward(self, images, tokens, token_mask, state, noise):  # the whole sampler, for convenience
        return self.sample_actions(images, tokens, token_mask, state, noise=noise)


def cache_to_tuple(cache) -> tuple[Tensor, ...]:
    """transformers DynamicCache → (K_0, V_0, K_1, V_1, …)."""
    return tuple(t for layer in cache.layers for t in (layer.keys, layer.values))


def tuple_to_cache(flat: tuple[Tensor, ...]):
    """(K_0, V_0, …) → a fresh transformers DynamicCache holding those tensors."""
    from transformers import DynamicCache

    return DynamicCache(tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2)))
