"""Capture a policy with torch.export: the prefix and the denoise step become separate FX graphs.

Export is non-strict, under `no_grad`, with a dynamic batch dimension, and keeps `aten.linear` (the export IR under
no_grad), so every nn.Linear is one node the passes can classify. Each graph records what its flat inputs are
(`graph.meta["qvla_inputs"]`: image / text / state / prefix / action / time / input), which is what region
assignment reads. A model that will not export raises ExportError naming the module that was running.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim

from qvla_compiler.errors import ExportError
from qvla_compiler.meta import INPUT_ROLES, INPUTS_KEY, InputRoleError  # noqa: F401 — re-exported

SCHEDULE_KEY = "qvla_schedule"
_OBS_ROLES = {"images": "image", "tokens": "text", "token_mask": "text", "state": "state"}
OBS_KEYS = tuple(_OBS_ROLES)
_ROLE_ALIASES = {"vision": "image", "backbone": "prefix", "action_head": "action"}  # region names, accepted too
# Forward-argument names (lower-cased) that say what a plain module's input is, when capture_module is not told.
ROLE_BY_ARG_NAME = {
    **dict.fromkeys(("pixel_values", "images", "image", "img", "rgb"), "image"),
    **dict.fromkeys(("input_ids", "tokens", "token_ids", "attention_mask", "token_mask", "lang_tokens"), "text"),
    **dict.fromkeys(("state", "states", "proprio", "proprioception", "robot_state"), "state"),
    **dict.fromkeys(("x_t", "noisy_actions", "noisy_action", "actions", "action", "sample"), "action"),
    **dict.fromkeys(("t", "timestep", "timesteps", "time", "sigma", "sigmas"), "time"),
    **dict.fromkeys(("past_key_values", "prefix", "kv", "prefix_kv", "kv_cache", "encoder_hidden_states",
                     "context", "prefix_features", "backbone_features"), "prefix"),
}


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
    obs, noise = widen_batch((obs, noise))
    args = tuple(obs[k] for k in OBS_KEYS)
    prefix_out = example_outputs(policy.embed_prefix, args)
    batch = _batch_dim()
    t = torch.full((noise.shape[0],), float(policy.schedule.timesteps[0]), device=noise.device)
    prefix = export_graph(PrefixStep(policy), args, tuple({0: batch} for _ in args),
                          roles=tuple(_OBS_ROLES[k] for k in OBS_KEYS), what="embed_prefix", prefix="policy.")
    denoise_shapes = (tuple({0: batch} for _ in prefix_out), {0: batch}, {0: batch})
    denoise = export_graph(DenoiseStep(policy), (tuple(prefix_out), noise, t), denoise_shapes,
                           roles=("prefix",) * len(prefix_out) + ("action", "time"), what="denoise_step",
                           prefix="policy.")
    return {"prefix": prefix, "denoise": denoise}


def example_outputs(fn: Callable[..., Any], args: tuple, real_run: Callable[[], Any] | None = None) -> tuple:
    """Zeros shaped like `fn(*args)`'s outputs (a tuple of tensors): the next graph's export example (export reads
    shapes and dtypes, not values), from a run on fake tensors that computes nothing (pi05-full's prefix took 140 s
    for real on 2 cores). If the fake run fails (an op without a fake kernel), `real_run()` or `fn(*args)` does."""
    with torch.no_grad():
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # parameters are converted as ops meet them
                fake = tuple(fn(*torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)))
        except Exception:  # noqa: BLE001 — the real run is always right, only slower
            return tuple(real_run() if real_run is not None else fn(*args))
    return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in fake)


def capture_module(module: nn.Module, args: Sequence[Any], input_roles: Mapping[str, str] | None = None, *,
                   canonical: bool = True, dynamic_batch: bool = True) -> dict[str, fx.GraphModule]:
    """{"forward": GraphModule} for a plain module, its flat inputs tagged with what they are.

    `input_roles` maps forward-argument names to roles (image / text / state / prefix / action / time / input; the
    region names vision / backbone / action_head also work); every leaf of a pytree argument gets its role.
    Arguments not named there are recognised by common names (pixel_values → image, input_ids → text, state →
    state, x_t / noisy_actions / sample → action, t / timestep / sigma → time, encoder_hidden_states /
    past_key_values → prefix), else count as plain inputs. Regions follow: action/time reach the action head.
    `canonical=False` keeps the graph exactly as torch.export gave it (for testing the canonicalising passes);
    `dynamic_batch=False` keeps the example's shapes (Dynamo graphs: Dynamo recompiles for new shapes itself).

    Example::

        graphs = capture_module(dit_step, (x_t, t, feats), input_roles={"feats": "backbone"})
    """
    args, capture = tuple(args), functools.partial(export_graph, module, what="forward", prefix="", canonical=canonical)
    roles = input_roles_of(module, args, input_roles or {})
    shapes, size = leading_batch(args) if dynamic_batch else None, _leading_size(args)
    try:  # any batch, like a policy's graphs; a module that fixes its batch (a reshape to 2) keeps the example's
        gm = capture(args, shapes, roles=roles)
    except ExportError as err:
        if shapes is None:
            raise
        gm, lines = capture(args, None, roles=roles), str(err).splitlines()
        why = next((line.strip() for line in lines if "cause:" in line), lines[0])
        _fixed_batch(gm, f"qvla: {type(module).__name__} exports only at the example's batch ({size}), so the "
                         f"program takes batch {size} only (another batch fails torch's input guard). Why the batch "
                         f"could not be dynamic: {why}")
        return {"forward": gm}
    if shapes is not None:
        _check_batch_one(gm, args, module, size)
    elif dynamic_batch and size == 1:
        _fixed_batch(gm, f"qvla: {type(module).__name__} has a batch-1 example, and torch.export specialises a size-1 "
                         "dimension: the program takes batch 1 only; give an example with batch 2 or more to take any "
                         "batch")
    return {"forward": gm}


class FixedBatchWarning(UserWarning):
    """A module's batch could not be made dynamic in capture: its program runs at the example's batch only (or, with
    a dynamic batch, not at batch 1)."""


def _check_batch_one(gm: fx.GraphModule, args: tuple, module: nn.Module, size: int) -> None:
    """torch.export can bound a size computed from the batch by the example's (a boolean-mask gather, as VLMs merge
    image features: 'Runtime assertion failed for expression u0 >= 512'); the program then fails at batch 1, the usual
    robot batch. Run the float graph there once and say so."""
    one = torch.utils._pytree.tree_map(
        lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size else t, args)
    try:
        with torch.no_grad():
            gm(*one)
    except (RuntimeError, AssertionError) as err:
        _fixed_batch(gm, f"qvla: {type(module).__name__}'s program fails at batch 1 ({str(err).splitlines()[0][:200]}): "
                         f"torch.export bounded a size by the example's batch ({size}); to run batch 1, capture with a "
                         "batch-1 example")


def _fixed_batch(gm: fx.GraphModule, message: str) -> None:
    from qvla_compiler.passes._graph import warn  # passes import us

    warn(gm, message, FixedBatchWarning)


def leading_batch(args: tuple):
    """dynamic_shapes marking dim 0 of every tensor as the batch where it has the first tensor's leading size (>= 2:
    export specialises a size-1 dimension), or None."""
    size = _leading_size(args)
    if size is None or size < 2:
        return None
    batch = _batch_dim()
    return torch.utils._pytree.tree_map(
        lambda t: {0: batch} if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size else None, args)


def _leading_size(args: tuple) -> int | None:
    """Dim 0 of the first tensor (of rank ≥ 1) among `args`' leaves: the example's batch."""
    return next((t.shape[0] for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.dim()),
                None)


def input_roles_of(module: nn.Module, args: tuple, given: Mapping[str, str]) -> tuple[str, ...]:
    """One role per flat input of `module(*args)`, in torch.export's placeholder order."""
    try:
        bound = inspect.signature(module.forward).bind(*args).arguments
    except TypeError as exc:
        raise ExportError(f"the example inputs do not fit {type(module).__name__}.forward: {exc}") from exc
    unknown = sorted(set(given) - set(bound))
    if unknown:
        raise InputRoleError(f"input_roles names {unknown}, which forward does not take from these example "
                             f"inputs; its arguments are {list(bound)}")
    roles = []
    for name, value in bound.items():
        role = _checked_role(name, given[name]) if name in given else ROLE_BY_ARG_NAME.get(name.lower(), "input")
        roles += [role] * len(torch.utils._pytree.tree_leaves(value))
    return tuple(roles)


def _checked_role(name: str, role: str) -> str:
    role = _ROLE_ALIASES.get(role, role)
    if role not in INPUT_ROLES:
        raise InputRoleError(f"input_roles[{name!r}] = {role!r} is not a role; use one of {list(INPUT_ROLES)} "
                             f"(or a region name: {list(_ROLE_ALIASES)})")
    return role


def export_graph(module: nn.Module, args: tuple, dynamic_shapes, *, roles: tuple[str, ...], what: str,
                 prefix: str, canonical: bool = True) -> fx.GraphModule:
    """torch.export → flat GraphModule with parameters as attributes; names parameters without `prefix`."""
    module = module.eval()
    with torch.no_grad():
        try:
            # Under no_grad the export IR is flat and already keeps aten.linear; no decomposition run is needed.
            with _index_without_autograd_function():
                ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # noqa: BLE001 — re-raised as a named error with the module path
            where = _failing_module(module, exc)
            op = _failing_op(exc)
            raise ExportError(
                f"torch.export could not capture {what}: {op} failed inside module '{where}'.\n"
                f"  cause: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
                "  fix: make that module traceable (no data-dependent Python control flow, no .item(), fixed "
                "token length); `torch.export.draft_export` gives a detailed report."
            ) from exc
    from qvla_compiler.passes import (canonicalize_linears, fold_computed_weights, inline_subgraphs,  # passes import us
                                      normalize_graph)
    from qvla_compiler.passes._graph import drop_unused_attributes

    # Canonical before anyone analyses it (the pipeline, the ATM teacher): in-place ops functional, so the role
    # rules see one vocabulary (bit-identical), and weights computed from parameters only (nn.MultiheadAttention's
    # in_proj slices) folded into real buffers that quantize like any other.
    gm = drop_unused_attributes(ep.module())
    if canonical:
        gm = fold_computed_weights(canonicalize_linears(normalize_graph(inline_subgraphs(gm))))
    gm.meta[INPUTS_KEY] = roles
    gm.meta["qvla_param_prefix"] = prefix
    return gm


@contextlib.contextmanager
def _index_without_autograd_function():
    """transformers builds padding masks by indexing under vmap inside torch's TransformGetItemToIndex, which indexes
    through an autograd.Function (ModIndex) that pre-dispatch export records as a `flat_apply` with a spec attribute;
    torch 2.13's verifier then rejects the graph ("function_const_func_spec0 is missing val field": GR00T under bf16
    autocast). ModIndex only adds a backward; capture runs under no_grad, so plain aten.index is the same forward."""
    import torch._dynamo._trace_wrapped_higher_order_op as wrapped

    real, wrapped.mod_index = wrapped.mod_index, lambda tensor, indices: torch.ops.aten.index(tensor, indices)
    try:
        yield
    finally:
        wrapped.mod_index = real


def widen_batch(tree: Any) -> Any:
    """The same example inputs with a batch of 2 when it is 1: torch.export specialises a dimension whose example
    size is 1 (the 0/1 specialisation), so a batch-1 example would give a program that only takes batch 1. The
    captured graphs and saved programs still accept any batch in 1..1024."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    if not leaves or any(t.dim() == 0 or t.shape[0] != 1 for t in leaves):
        return tree
    return torch.utils._pytree.tree_map(
        lambda t: t.expand(2, *t.shape[1:]).clone() if isinstance(t, torch.Tensor) else t, tree)


def _batch_dim():
    return Dim("batch", min=1, max=1024)


def _failing_module(root: nn.Module, exc: BaseException) -> str:
    """Innermost module whose forward was running when `exc` was raised (read from the traceback's frames)."""
    names = {id(m): n for n, m in root.named_modules()}
    where, tb = "<top level>", exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            where = names[id(owner)] or type(owner).__name__
        tb = tb.tb_next
    return where


def _failing_op(exc: Exception) -> str:
    text = str(exc)
    for token in text.replace("(", " ").replace(")", " ").split():
        if token.startswith(("aten.", "torch.ops.")):
            return token.rstrip(".,:")
    return type(exc).__name__
