"""SmoothQuant (quantvla.md §11): migrate activation outliers into the weights, folded into the preceding norm.

Before: norm → [type_as] → x → obs → {linears}, the norm's output scaled by a constant gain (RMSNorm `· w` or
        Gemma's `· (1 + w)`, or LayerNorm's affine weight/bias), for groups annotated "smoothquant" or "awq"
        (AWQ-style scales, searched on the observer's sample, folded the same way).
After:  the gain reads a new buffer γ/s (Gemma: (1 + w)/s − 1; LayerNorm: weight/s, bias/s) and every linear of the
        group reads W·diag(s): s_j = max|X_j|^α / max|W_:j|^(1−α). No op is added: where the input is not such a
        gain (AdaLN/adaRMS modulation, LayerNorm without affine, o_proj/down_proj inputs), rotate_and_smooth never
        annotates the group, since an online multiply would change the operator schedule.
Decides first: fit_smoothing stores s (GroupTransform.smooth) from the observer; smooth_linears only rewrites.
Invariant: exact in real arithmetic.
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx

from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.rotate_common import (add_tensor, group_rotation, group_transform, groups_to_fit,
                                               observed_groups, replace_weight, set_group_transform, weight_of)
from qvla_compiler.passes.quantize_linears import _fetch
from qvla_compiler.quant.awq import awq_search_scales
from qvla_compiler.quant.smoothquant import smoothquant_scales

_CASTS = frozenset({g.aten.type_as.default, g.aten.to.dtype, g.aten._to_copy.default})


@dataclasses.dataclass(frozen=True)
class NormFold:
    """Where 1/s goes: the gain get_attr, the node reading it, an optional bias, and Gemma's 1 + w form."""

    gain: fx.Node
    reader: fx.Node
    bias: fx.Node | None = None
    unit_offset: bool = False


def find_norm_fold(x: fx.Node) -> NormFold | None:
    """The constant per-channel gain that `x` (an observed linear input) is directly scaled by, or None."""
    node = x
    while _is(node, _CASTS) and len(node.users) == 1:
        node = node.args[0]
    if len(node.users) != 1 and node is not x or len(x.users) != 1:
        return None  # someone else reads the normed value: dividing it by s would change them
    width = x.meta["val"].shape[-1]
    if _is(node, {g.aten.layer_norm.default}) and _attr(node.args[2], width):
        bias = node.args[3] if len(node.args) > 3 and _attr(node.args[3], width) else None
        return NormFold(node.args[2], node, bias)
    if not _is(node, {g.aten.mul.Tensor}):
        return None
    for gain in node.args:
        fold = _gain(gain, node, width)
        if fold is not None:
            return fold
    return None


def _gain(node, reader: fx.Node, width: int) -> NormFold | None:
    offset = False
    if _is(node, {g.aten.add.Tensor}) and node.args[1] == 1.0 and len(node.users) == 1:
        node, reader, offset = node.args[0], node, True
    while _is(node, _CASTS) and len(node.users) == 1:
        node, reader = node.args[0], node
    return NormFold(node, reader, None, offset) if _attr(node, width) else None


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _attr(node, width: int) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and tuple(node.meta["val"].shape) == (width,)


def fit_smoothing(gm: fx.GraphModule, alpha: float = 0.5) -> fx.GraphModule:
    """Decide s for every group annotated "smoothquant" (s_j = max|X_j|^α / max|W_:j|^(1−α)) or "awq" (s = mean|X|^α
    with α searched per group for the least output error of the rounded weights), from its calibrated observer."""
    for obs_node, obs, linears in groups_to_fit(gm):
        parts = group_rotation(linears).split("+")
        if "smoothquant" in parts or "awq" in parts:
            obs.require_data()
            weights = [weight_of(gm, lin).double() for lin in linears]
            if "awq" in parts:
                spec, x = linears[0].meta["qvla"].spec, obs.sample.double()
                s, _ = awq_search_scales(weights, x.abs().mean(0), x, spec.w_bits, spec.group_size)
            else:
                s = smoothquant_scales(obs.channel_absmax.double(), weights, alpha)
            set_group_transform(obs_node, smooth=s)
    return gm


def smooth_linears(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold each "smoothquant" / "awq" group's fitted s into the norm and the weights; see the module docstring."""
    for obs_node, _, linears in observed_groups(gm):
        if not {"smoothquant", "awq"} & set(group_rotation(linears).split("+")):
            continue
        s = group_transform(obs_node, linears).smooth
        fold = find_norm_fold(obs_node.args[0])
        gain = _fetch(gm, fold.gain).double()
        # y = (x/s)(W·diag(s))ᵀ = xWᵀ: the norm emits x/s, each consumer's column j is scaled by s_j
        new_gain = (1 + gain) / s - 1 if fold.unit_offset else gain / s
        _replace_constant(gm, fold.reader, fold.gain, new_gain)
        if fold.bias is not None:
            _replace_constant(gm, fold.reader, fold.bias, _fetch(gm, fold.bias).double() / s)
        for lin in linears:
            replace_weight(gm, lin, lambda: weight_of(gm, lin).double() * s)
    gm.graph.lint()
    gm.recompile()
    return gm


def _replace_constant(gm: fx.GraphModule, reader: fx.Node, old: fx.Node, value) -> None:
    reader.replace_input_with(old, add_tensor(gm, "smooth_" + old.target, value.to(old.meta["val"].dtype), reader))
