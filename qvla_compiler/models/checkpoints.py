"""Trained weights of the tabletop presets: safetensors files in qvla_compiler/eval/checkpoints, fp16 on disk.

`build_policy("pi05-tabletop")` calls `load_checkpoint_if_present`, so the trained policy loads by name; without the
file the policy keeps its random weights (the tests that need trained weights skip).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qvla_compiler.errors import QvlaError

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "eval" / "checkpoints"
TRAINED_PRESETS: tuple[str, ...] = ("pi05-tabletop", "groot-tabletop")

__all__ = ["CHECKPOINT_DIR", "TRAINED_PRESETS", "checkpoint_path", "has_checkpoint", "load_checkpoint",
           "load_checkpoint_if_present", "save_checkpoint"]


def checkpoint_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.safetensors"


def has_checkpoint(name: str) -> bool:
    return name in TRAINED_PRESETS and checkpoint_path(name).is_file()


def save_checkpoint(policy: nn.Module, path: str | Path, metadata: dict | None = None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write the policy's floating-point state dict in `dtype` (fp16: half the bytes) with string metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in policy.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_checkpoint(policy: nn.Module, path: str | Path) -> dict:
    """Load a checkpoint into `policy` (cast to the policy's dtype); returns the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    state = load_file(str(path))
    own = policy.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise QvlaError(f"checkpoint {path} does not fit {type(policy).__name__}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}; retrain it with training/train_tabletop.py")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise QvlaError(f"checkpoint {path}: {k} has shape {tuple(v.shape)}, the policy {tuple(own[k].shape)}; "
                            "the preset changed since training, retrain with training/train_tabletop.py")
    policy.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_checkpoint_if_present(policy: nn.Module, name: str) -> bool:
    if not has_checkpoint(name):
        return False
    policy.checkpoint_metadata = load_checkpoint(policy, checkpoint_path(name))
    policy.eval()
    return True
