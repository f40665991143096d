"""What `quantize` needs from a VLA policy, as an explicit Protocol checked member by member.

A module is quantized as a policy (prefix graph + denoise-step graph + Euler sampler) only when it has both
`embed_prefix` and `denoise_step`; it must then have every other required member too, or ProtocolError names the
missing ones. A module without both is a plain module (one forward graph), whatever else it has — lerobot's
`PI05Pytorch`, for example, has an `embed_prefix` but is not driven through this protocol.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.models.sampling import FlowSchedule

# (member, what quantize uses it for); methods must be callable. `calibration_batches` is optional (CALIB_MEMBER).
REQUIRED: tuple[tuple[str, str], ...] = (
    ("embed_prefix", "method (images, tokens, token_mask, state) -> tuple of prefix tensors, captured as a graph"),
    ("denoise_step", "method (prefix, x_t, t) -> velocity, captured as a graph"),
    ("schedule", "attribute: a FlowSchedule with .timesteps, driving the Euler sampler"),
    ("example_noise", "method (batch, seed=) -> initial action noise"),
    ("sample_actions", "method (images, tokens, token_mask, state, noise=) -> actions, the float reference"),
)
CALIB_MEMBER = "calibration_batches"  # method (n, seed=) -> observation dicts; needed only when calib is None
_DETECT = ("embed_prefix", "denoise_step")
_ATTRIBUTES = ("schedule",)


class ProtocolError(QvlaError, TypeError):
    """A module looks like a VLA policy (embed_prefix and denoise_step) but lacks other members quantize needs."""


@runtime_checkable
class VLAPolicy(Protocol):
    """The members `qvla_compiler.quantize` uses on a policy; see REQUIRED for what each one is for."""

    schedule: FlowSchedule

    def embed_prefix(self, images: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def denoise_step(self, prefix: tuple[torch.Tensor, ...], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def example_noise(self, batch: int, seed: int = 0) -> torch.Tensor: ...

    def sample_actions(self, images: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                       state: torch.Tensor, *, noise: torch.Tensor) -> torch.Tensor: ...


def missing_members(module: Any, *, need_calibration: bool = False) -> list[str]:
    """Required members `module` lacks (or has but cannot call), in REQUIRED order."""
    wanted = [name for name, _ in REQUIRED] + ([CALIB_MEMBER] if need_calibration else [])
    return [name for name in wanted if not _has(module, name)]


def is_policy(module: Any, *, need_calibration: bool = False) -> bool:
    """True: quantize as a policy. False: quantize as a plain module. Raises ProtocolError for a half policy."""
    if not all(_has(module, name) for name in _DETECT):
        return False
    missing = missing_members(module, need_calibration=need_calibration)
    if missing:
        what = {name: role for name, role in REQUIRED}
        what[CALIB_MEMBER] = "method (n, seed=) -> observation dicts, used because calib=None"
        lines = "\n".join(f"  - {name}: {what[name]}" for name in missing)
        raise ProtocolError(
            f"{type(module).__name__} has embed_prefix and denoise_step, so it is quantized as a VLA policy, but it "
            f"lacks {', '.join(missing)}:\n{lines}\nfix: add them (see qvla_compiler.protocol.VLAPolicy)"
            + (", or pass calib=[obs, ...]" if missing == [CALIB_MEMBER] else "")
            + "; or wrap the module so it exposes neither embed_prefix nor denoise_step to quantize its forward "
            "as a plain module")
    return True


def _has(module: Any, name: str) -> bool:
    try:
        value = getattr(module, name)
    except Exception:  # noqa: BLE001 — a property that raises counts as missing
        return False
    return value is not None and (name in _ATTRIBUTES or callable(value))
