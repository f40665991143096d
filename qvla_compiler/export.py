"""Capture a policy with torch.export: the prefix and the denoise step become separate FX graphs.

Export is non-strict, under `no_grad`, with a dynamic batch dimension, and keeps `aten.linear` (empty decomposition
table), so every nn.Linear is one node the passes can classify. Each graph records what its flat inputs are
(`graph.meta["qvla_inputs"]`: image / text / state / prefix / action / time / input), which is what region
assignment reads. A model that will not export raises ExportError naming the module that was running.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

from qvla_compiler.errors import ExportError

INPUTS_KEY = "qvla_inputs"
SCHEDULE_KEY = "qvla_schedule"
_OBS_ROLES = {"images": "image", "tokens": "text", "token_mask": "text", "state": "state"}
OBS_KEYS = tuple(_OBS_ROLES)


class PrefixStep(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, images, tokens, token_mask, state):
        return self.policy.embed_prefix(images, tokens, token_mask, state)


class DenoiseStep(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, prefix, x_t, t):
        return self.policy.denoise_step(prefix, x_t, t)


def capture_policy(policy: nn.Module, obs: dict[str, torch.Tensor], noise: torch.Tensor) -> dict[str, fx.GraphModule]:
    """{"prefix": GraphModule, "denoise": GraphModule} for a policy with embed_prefix / denoise_step."""
    args = tuple(obs[k] for k in OBS_KEYS)
    with torch.no_grad():
        prefix_out = policy.embed_prefix(*args)
    batch = _batch_dim()
    t = torch.full((noise.shape[0],), float(policy.schedule.timesteps[0]))
    prefix = export_graph(PrefixStep(policy), args, tuple({0: batch} for _ in args),
                          roles=tuple(_OBS_ROLES[k] for k in OBS_KEYS), what="embed_prefix", prefix="policy.")
    denoise_shapes = (tuple({0: batch} for _ in prefix_out), {0: batch}, {0: batch})
    denoise = export_graph(DenoiseStep(policy), (tuple(prefix_out), noise, t), denoise_shapes,
                           roles=("prefix",) * len(prefix_out) + ("action", "time"), what="denoise_step",
                           prefix="policy.")
    return {"prefix": prefix, "denoise": denoise}


def capture_module(module: nn.Module, args: Sequence[Any]) -> dict[str, fx.GraphModule]:
    """{"forward": GraphModule} for a plain module; every input counts as a plain input."""
    flat = torch.utils._pytree.tree_leaves(tuple(args))
    gm = export_graph(module, tuple(args), None, roles=("input",) * len(flat), what="forward", prefix="")
    return {"forward": gm}


def export_graph(module: nn.Module, args: tuple, dynamic_shapes, *, roles: tuple[str, ...], what: str,
                 prefix: str) -> fx.GraphModule:
    """torch.export → flat GraphModule with parameters as attributes; names parameters without `prefix`."""
    module = module.eval()
    with torch.no_grad(), _module_trail(module) as running:
        try:
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            ep = ep.run_decompositions(decomp_table={})
        except Exception as exc:  # noqa: BLE001 — re-raised as a named error with the module path
            where = running[-1] if running else "<top level>"
            op = _failing_op(exc)
            raise ExportError(
                f"torch.export could not capture {what}: {op} failed inside module '{where}'.\n"
                f"  cause: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
                "  fix: make that module traceable (no data-dependent Python control flow, no .item(), fixed "
                "token length); `torch.export.draft_export` gives a detailed report."
            ) from exc
    gm = ep.module()
    gm.meta[INPUTS_KEY] = roles
    gm.meta["qvla_param_prefix"] = prefix
    return gm


def _batch_dim():
    return Dim("batch", min=1, max=1024)


@contextlib.contextmanager
def _module_trail(root: nn.Module):
    """Track which submodule is running, so an export failure can name it (non-strict export runs the code)."""
    stack: list[str] = []  # modules entered and not yet left; after an exception, the innermost is last
    names = {m: n for n, m in root.named_modules()}
    handles = []

    def pre(mod, _args):
        stack.append(names.get(mod, type(mod).__name__) or type(mod).__name__)

    def post(mod, _args, _out):
        if stack:
            stack.pop()

    for mod in names:
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _failing_op(exc: Exception) -> str:
    text = str(exc)
    for token in text.replace("(", " ").replace(")", " ").split():
        if token.startswith(("aten.", "torch.ops.")):
            return token.rstrip(".,:")
    return type(exc).__name__
