"""Decide and apply the recipe's smoothing and rotation on every observed integer-linear input.

Before: observers on integer linears' inputs (calibrated, for fit_transforms).
After:  fit_transforms decides: every linear of a group gets LinearInfo.rotation, e.g. "smoothquant+duquant", or
        None — SmoothQuant only where find_norm_fold finds a constant gain to fold 1/s into, Hadamard only for
        supported widths, DuQuant and SVD·Hadamard everywhere; "quarot" first tags the foldable residual streams
        (rotate_residual), its readers get "quarot" (no online op, no SmoothQuant: the fold resets the norm gain)
        and every other group the per-input "hadamard". The data-fitted tensors (SmoothQuant s, DuQuant Λ, R₁, P,
        R₂; SVD·Hadamard Λ, R₁) go into each group's GroupTransform. rotate_and_smooth then rewrites from those
        annotations only (smooth_linears, then the rotation pass from ROTATION_PASSES), so a plan that carries them
        replays the same rewrite without data. A weight read at several call sites (a block applied twice, in any
        graph) gets one transform, its first call site's, so that it keeps one integer copy: the plan holds one per
        module path.
Invariant: the float program computes the same function (every rewrite is exact in real arithmetic); in a plan's
        program, once lower_linears has replaced the linears holding the plan's integers (replace_weight skips them).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable

import networkx as nx
import torch.fx as fx

from qvla_compiler.meta import info, update
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.rotate_common import FITTED_AT, TRANSFORM, group_rotation, observed_groups
from qvla_compiler.passes.rotate_duquant import fit_block_transforms, fit_duquant, rotate_duquant
from qvla_compiler.passes.rotate_hadamard import rotate_hadamard
from qvla_compiler.passes.rotate_residual import StreamRole, annotate_residual_streams, residual_tag, rotate_residual
from qvla_compiler.passes.smooth_linears import find_norm_fold, fit_smoothing, smooth_linears
from qvla_compiler.quant.hadamard import supported_width
from qvla_compiler.quant.svd_hadamard import calibrate_svd_hadamard
from qvla_compiler.recipes import QuantRecipe


class QuaRotFallbackWarning(UserWarning):
    """QuaRot found no residual stream it can fold (post-norms, LayerNorm, an op in between):
    the graph's quantized inputs get the online Hadamard instead, as `hadamard` would give them."""


def _quarot(gm: fx.GraphModule) -> fx.GraphModule:
    annotate_residual_streams(gm)  # structural and deterministic: the same streams as when the labels were decided
    quantized = [info(n).module_path for n in g.linear_nodes(gm) if info(n).is_quantized]
    if quantized and not any(residual_tag(n) is not None for n in gm.graph.nodes):
        g.warn(gm, f"qvla: QuaRot found no foldable residual stream in the graph of {quantized[0]} (it folds pre-norm "
                   "RMSNorm streams only — written out or nn.RMSNorm's fused op — not post-norms or LayerNorm): its "
                   "quantized inputs get an online Hadamard instead, as with rotation='hadamard'", QuaRotFallbackWarning)
    return rotate_hadamard(rotate_residual(gm))


# rotation name → (can this input width take it?, the pass applying it)
ROTATION_PASSES: dict[str, tuple[Callable[[int], bool], Callable[[fx.GraphModule], Any]]] = {
    "hadamard": (supported_width, rotate_hadamard),
    "duquant": (lambda width: True, rotate_duquant),
    # Ω-QVLA's composite rotation: per block the weight's PCA basis times a Hadamard, as a DuQuant-style transform
    "svd-hadamard": (lambda width: True, partial(rotate_duquant, label="svd-hadamard")),
    # QuaRot: the residual stream R1 folded into the weights, then the per-input pair for every other group
    "quarot": (supported_width, _quarot),
}


def needs_rotation(recipe: QuantRecipe) -> bool:
    return recipe.rotation != "none" or recipe.smooth != "none"


def fit_transforms(graphs: Iterable[fx.GraphModule], recipe: QuantRecipe) -> None:
    """Decide every group's transforms and fit their tensors from the calibrated observers (annotations only)."""
    if not needs_rotation(recipe):
        return
    graphs = list(graphs)
    for gm in graphs:
        if recipe.rotation == "quarot":
            annotate_residual_streams(gm)
        for obs_node, _, linears in observed_groups(gm):
            parts = _group_parts(recipe, obs_node, linears)
            for lin in linears:
                update(lin, rotation="+".join(parts) or None)
    sharing = _align_shared_groups(graphs)
    for first, *others in sharing:  # fitted once, at the first call site
        for obs_node in others:
            obs_node.meta[FITTED_AT] = first
    for gm in graphs:
        if recipe.smooth != "none":
            fit_smoothing(gm, recipe.smooth_alpha)
        if recipe.rotation == "duquant":
            fit_duquant(gm, recipe.rotation_block, recipe.smooth_alpha)
        if recipe.rotation == "svd-hadamard":
            fit_block_transforms(gm, "svd-hadamard", lambda x, ws: calibrate_svd_hadamard(
                x, ws, block=recipe.rotation_block, alpha=recipe.smooth_alpha))
    for first, *others in (nodes for nodes in sharing if TRANSFORM in nodes[0].meta):
        for obs_node in others:  # the first site's transform for all (GPTQ uses its Hessian too)
            obs_node.meta[TRANSFORM] = first.meta[TRANSFORM]


def _align_shared_groups(graphs: list[fx.GraphModule]) -> list[list[fx.Node]]:
    """Sets (two or more, graph order) of observer nodes whose linears share a module path. SmoothQuant folds into
    a norm, which not every call site may have: such a set drops it everywhere, so all take the same parts."""
    links, groups = nx.Graph(), {}
    for gm in graphs:
        for obs_node, _, linears in observed_groups(gm):
            groups[obs_node] = linears
            links.add_edges_from((obs_node, lin.meta["qvla"].module_path) for lin in linears)
    sets = [[n for n in groups if n in part] for part in nx.connected_components(links)]
    for nodes in (nodes for nodes in sets if len(nodes) > 1):
        labels = [group_rotation(groups[n]).split("+") for n in nodes]
        dropped = {"smoothquant", "awq"} & (set().union(*labels) - set.intersection(*map(set, labels)))
        for node, parts in zip(nodes, labels):
            for lin in groups[node]:
                update(lin, rotation="+".join(p for p in parts if p and p not in dropped) or None)
    return [nodes for nodes in sets if len(nodes) > 1]


def rotate_and_smooth(gm: fx.GraphModule, recipe: QuantRecipe) -> fx.GraphModule:
    """Rewrite every group as its annotations say: smoothing folded, then the recipe's rotation pass."""
    if recipe.smooth != "none":
        smooth_linears(gm)
    if recipe.rotation in ROTATION_PASSES:
        ROTATION_PASSES[recipe.rotation][1](gm)
    return gm


def _group_parts(recipe: QuantRecipe, obs_node, linears) -> list[str]:
    tag = residual_tag(linears[0])
    if recipe.rotation == "quarot" and tag is not None and tag.role is StreamRole.READER:
        return ["quarot"]  # reads a folded residual stream: nothing online
    parts = []
    if recipe.smooth != "none" and find_norm_fold(obs_node.args[0]) is not None:
        parts.append(recipe.smooth)
    if recipe.rotation in ROTATION_PASSES and ROTATION_PASSES[recipe.rotation][0](linears[0].meta["qvla"].in_features):
        parts.append("hadamard" if recipe.rotation == "quarot" else recipe.rotation)
    return parts
