"""Assign every linear a region by dataflow: vision tower, language backbone, or action head.

Before: linears annotated by classify_linears; `gm.meta["qvla_inputs"]` names what each graph input is.
After:  LinearInfo.region is set on every linear; the graph is unchanged.
Rule:   a linear whose input depends on the noisy actions or the timestep is in the action head; attention K/V
        projections join the region of the query they serve (cross-attention K/V read the backbone's features
        but belong to the head's attention); a linear that depends on the images and on nothing else observed
        (no text, no state) is in the vision tower; everything else is backbone. User overrides by module-path
        prefix win. A query computed from parameters only (a learned probe) takes its K/V's region, any other
        linear computed from parameters only the region of the nearest linear it feeds. Only values
        count, not shapes: a `reshape(B, ...)` in the vision tower whose B export reads from the text input does
        not make it backbone. Plain modules get the same rule: capture_module tags their inputs by argument name
        or input_roles.
"""
from __future__ import annotations

import torch.fx as fx

from qvla_compiler.meta import INPUT_ROLES, INPUTS_KEY, InputRoleError, Region, Role, update
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.classify_linears import _override

_ACTION_INPUTS = frozenset({"action", "time"})
_OBSERVED_INPUTS = frozenset({"text", "state"})


def assign_regions(gm: fx.GraphModule, region_overrides: tuple = ()) -> fx.GraphModule:
    """Set LinearInfo.region on every linear of `gm`; see the module docstring."""
    roles = gm.meta.get(INPUTS_KEY, ())
    if set(roles) - set(INPUT_ROLES):
        raise InputRoleError(f"graph inputs tagged {sorted(set(roles) - set(INPUT_ROLES))}, which are not roles; "
                             f"tag each input as one of {list(INPUT_ROLES)}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kinds = {p: roles[i] if i < len(roles) else "input" for i, p in enumerate(placeholders)}
    linears = g.linear_nodes(gm)
    constant = []  # input computed from parameters only: a learned query (SigLIP's pooling probe, Perceiver latents)
    for node in linears:
        sources = {kinds[a] for a in g.data_ancestors(node.args[0]) if a.op == "placeholder"}
        update(node, region=_region(sources))
        if not sources:
            constant.append(node)
    _place_constant_inputs(constant, linears)
    _kv_follow_query(linears)
    for node in linears:
        forced = _override(node.meta["qvla"].module_path, region_overrides)
        if forced is not None:
            update(node, region=Region(forced))
    blocks = [n.meta["qvla"] for n in linears if n.meta["qvla"].role is not Role.OTHER]
    if "prefix" in roles and blocks and all(i.region is Region.BACKBONE for i in blocks):
        g.warn(gm, "qvla: this graph reads backbone features, but none of its attention / MLP linears depends on an "
                   "input tagged action or time, so all count as backbone (the quantvla layout quantizes their "
                   "attention too); if it is an action head, tag its noisy actions: input_roles={'<argument>': "
                   "'action'}", InputRoleWarning)
    return gm


class InputRoleWarning(UserWarning):
    """A graph's inputs leave its regions to guesswork (backbone features in, no block reached by action or time)."""


def _region(sources: set[str]) -> Region:
    if sources & _ACTION_INPUTS:
        return Region.ACTION_HEAD
    if "image" in sources and not sources & _OBSERVED_INPUTS:
        return Region.VISION
    return Region.BACKBONE


def _place_constant_inputs(constant: list[fx.Node], linears: list[fx.Node]) -> None:
    """A learned query reads no input: it belongs where what it attends to comes from. Other linears that read no
    input (a Q-Former's self-attention over its queries) belong where their output goes: the nearest linear
    downstream that reads data, or such a query."""
    kv_region = {n.meta["qvla"].block: n.meta["qvla"].region for n in linears
                 if n.meta["qvla"].role in (Role.ATTN_K, Role.ATTN_V, Role.ATTN_KV) and n not in constant}
    settled = set(linears) - set(constant)
    for node in constant:
        if node.meta["qvla"].role is Role.ATTN_Q and node.meta["qvla"].block in kv_region:
            update(node, region=kv_region[node.meta["qvla"].block])
            settled.add(node)
    for node in reversed([n for n in constant if n not in settled]):  # what a constant linear feeds comes first
        after = min((n for n in g.descendants(node) if n in settled and n is not node), default=None)
        if after is not None:
            update(node, region=after.meta["qvla"].region)
            settled.add(node)


def _kv_follow_query(linears: list[fx.Node]) -> None:
    query_region = {n.meta["qvla"].block: n.meta["qvla"].region for n in linears
                    if n.meta["qvla"].role in (Role.ATTN_Q, Role.ATTN_QKV)}
    for node in linears:
        info = node.meta["qvla"]
        if info.role in (Role.ATTN_K, Role.ATTN_V, Role.ATTN_KV) and info.block in query_region:
            update(node, region=query_region[info.block])
