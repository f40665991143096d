"""Helpers shared by the rotation and smoothing passes: observed input groups, online ops, weight replacement.

A group is one observer node and the integer linears reading it (q/k/v share one, gate/up share one). What was
fitted for a group (SmoothQuant's s, DuQuant's Λ, R₁, P, R₂) is a GroupTransform in the observer node's meta, set by
rotate_and_smooth.fit_transforms during calibration or by load_plan_tensors from a plan; the rewrites read it. An online
transform goes between the observed value and its observer (x → op(x) → obs → linears), so only the group's
linears see it and a re-calibration observes the transformed activation. Weights are never changed in place (the
captured graph shares its tensors with the float policy): a transformed weight becomes a new buffer.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx as fx

from qvla_compiler.errors import QvlaError
from qvla_compiler.quant.duquant import DuQuantTransform
from qvla_compiler.quant.observers import ActObserver
from qvla_compiler.passes.insert_observers import OBSERVER_PREFIX
from qvla_compiler.passes.quantize_linears import _fetch


TRANSFORM = "qvla_transform"
FITTED_AT = "qvla_fitted_at"  # observer meta: the first call site of the same weights, whose fit this one takes


@dataclasses.dataclass(frozen=True)
class GroupTransform:
    """The fitted tensors of one observed group's transforms (None: that transform is not applied)."""

    smooth: torch.Tensor | None = None  # SmoothQuant s [K], float64
    duquant: DuQuantTransform | None = None


def group_transform(obs_node: fx.Node, linears: list[fx.Node]) -> GroupTransform:
    """The group's fitted transforms; a group labelled for one that was never fitted is a bug or a bad plan."""
    found = obs_node.meta.get(TRANSFORM)
    if found is None:
        raise QvlaError(f"no fitted transform for the input of {linears[0].meta['qvla'].module_path} "
                        f"({group_rotation(linears)}): fit_transforms or the plan must set it before the rewrite")
    return found


def set_group_transform(obs_node: fx.Node, **fields) -> None:
    obs_node.meta[TRANSFORM] = dataclasses.replace(obs_node.meta.get(TRANSFORM, GroupTransform()), **fields)


def observed_groups(gm: fx.GraphModule) -> list[tuple[fx.Node, ActObserver, list[fx.Node]]]:
    """(observer node, observer module, linears reading it) in graph order."""
    groups = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
            groups.append((node, gm.get_submodule(node.target), list(node.users)))
    return groups


def groups_to_fit(gm: fx.GraphModule) -> list[tuple[fx.Node, ActObserver, list[fx.Node]]]:
    """observed_groups less the call sites whose transform another site's fit gives (FITTED_AT)."""
    return [group for group in observed_groups(gm) if FITTED_AT not in group[0].meta]


def group_rotation(linears: list[fx.Node]) -> str:
    """The rotation annotation of a group (its linears share one input, hence one decision)."""
    return linears[0].meta["qvla"].rotation or ""


def add_tensor(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `value` as a buffer with a fresh name and return a get_attr node placed before `before`."""
    base, i = "qvla_rot_" + name.replace(".", "_"), 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    buffer = value.detach().contiguous()
    gm.register_buffer(f"{base}_{i}", buffer)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(f"{base}_{i}")
    node.meta["val"] = buffer  # the buffer object itself: releasing it (consume) must leave no other holder
    return node


def insert_online(gm: fx.GraphModule, obs: fx.Node, op, tensors: dict[str, torch.Tensor | None], *scalars) -> fx.Node:
    """x → op(x, *tensors, *scalars) → obs: the group's online transform, one node."""
    x = obs.args[0]
    dtype = x.meta["val"].dtype  # matrices in the activation's dtype: exact pairs in float64 graphs too
    tensors = {k: t.to(dtype) if t is not None and t.is_floating_point() else t for k, t in tensors.items()}
    args = [x] + [None if t is None else add_tensor(gm, k, t, obs) for k, t in tensors.items()] + list(scalars)
    with gm.graph.inserting_before(obs):
        node = gm.graph.call_function(op, tuple(args))
    node.meta["val"] = x.meta.get("val")
    obs.replace_input_with(x, node)
    return node


def weight_of(gm: fx.GraphModule, linear: fx.Node) -> torch.Tensor:
    return _fetch(gm, linear.args[1])


def replace_weight(gm: fx.GraphModule, linear: fx.Node, weight: Callable[[], torch.Tensor]) -> None:
    """Point `linear` at a new buffer holding `weight()`; drop the old attribute when nothing reads it any more.
    A linear already holding its integers (a plan's program) is left as it is: lowering drops its float weight, so a
    transformed copy would only cost memory (at full size, a copy of every integer weight at once)."""
    if "qvla_tensors" in linear.meta:
        return
    replace_input(gm, linear, linear.args[1], weight(), linear.meta["qvla"].module_path + ".weight")


def replace_input(gm: fx.GraphModule, node: fx.Node, old: fx.Node, value: torch.Tensor, name: str) -> None:
    """Point `node`'s get_attr input `old` at a new buffer holding `value` (in old's dtype); drop old if unread."""
    new = add_tensor(gm, name, value.to(old.meta["val"].dtype), node)
    node.replace_input_with(old, new)
    if not old.users:
        gm.graph.erase_node(old)
        if not any(n.op == "get_attr" and n.target == old.target for n in gm.graph.nodes):
            owner, _, attr = old.target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


def track_hessians(gm: fx.GraphModule, on: bool = True) -> fx.GraphModule:
    """Let every observer accumulate its input's Hessian 2·XᵀX (for GPTQ); one K×K fp32 each."""
    for _, obs, _ in observed_groups(gm):
        obs.track_hessian = on
    return gm


def reset_observers(gm: fx.GraphModule) -> None:
    """Forget every observer's statistics, so a second calibration sees the transformed activations."""
    for _, obs, _ in observed_groups(gm):
        obs.reset()
