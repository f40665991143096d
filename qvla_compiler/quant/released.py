"""Float weights a compile has consumed (`quantize(..., consume=True)`, what `qvla quantize` does).

Releasing swaps the tensor object's contents for a ReleasedWeight (shape, dtype and device, no storage). The policy,
the captured graphs and their forks hold that same object (torch.export's module and Program.fork share parameters
by identity), so the bytes go back at once, and any op that later reads the weight raises ConsumedWeightError. A meta
tensor would not fail safely (CPU addmm with a meta weight returned numbers), nor a storage resized to zero bytes (a
read crashed the process). Only weights whose integer copy exists are released: passes/quantize_linears.py.
"""
from __future__ import annotations

import torch

from qvla_compiler.errors import QvlaError


class ConsumedWeightError(QvlaError, RuntimeError):
    """A float weight released by a consuming compile was used again."""


class ReleasedWeight(torch.Tensor):
    """A weight's shape, dtype and device without its values; every op on it raises ConsumedWeightError."""

    @staticmethod
    def __new__(cls, like: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise ConsumedWeightError(
            f"{func} read a float weight that quantize(..., consume=True) released once its integer copy existed "
            "(the float policy cannot run after a consuming compile); build the policy again, or compile it with "
            "consume=False to keep it usable")

    def __repr__(self) -> str:
        return f"ReleasedWeight({list(self.shape)}, {self.dtype})"


def release(t: torch.Tensor) -> None:
    """Swap `t`'s class, attributes and tensor impl for a ReleasedWeight's, keeping the object (so every holder
    sees it). What torch.utils.swap_tensors does, minus its weak-reference check: torch.export's fake-tensor memo
    keeps weak references to each parameter it traced, keyed on identity, which the swap leaves meaningful."""
    empty = ReleasedWeight(t)
    t.__class__, empty.__class__ = empty.__class__, t.__class__
    t.__dict__, empty.__dict__ = empty.__dict__, t.__dict__
    torch._C._swap_tensor_impl(t, empty)


def is_released(t: torch.Tensor) -> bool:
    return isinstance(t, ReleasedWeight)


def storage_key(t: torch.Tensor) -> int:
    """One key per storage (views and tied aliases share it); a released weight has none, so its object's id."""
    return id(t) if is_released(t) else t.untyped_storage().data_ptr()
