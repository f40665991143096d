"""Lower quantized linears to `qvla::` ops.

Before: y = aten.linear(x, W, b) with LinearInfo.spec set and QuantTensors in node.meta["qvla_tensors"].
After:  xq, xs = qvla::quantize_act(x, a_bits, static_scale)     — one per (x, a_bits, static scale), shared;
        a per-step scale table [S] is read as static_scale = qvla::step_scale(table, bounds, t, rank)
        y = qvla::int8_linear(xq, xs, Wq, Ws, b, dtype)           — W8
        y = qvla::int4_linear(xq, xs, Wp, Ws, b, group, dtype)    — W4 (packed, per-group scales)
        y = qvla::bitplane_linear(xq, xs, Wp, Ws, b, bits, group, dtype)  — W3, W2 (bit-planes, per-group scales)
        and the float weight W is deleted from the module once no node reads it (the saved program carries only
        the integer form). Call sites sharing one weight share one get_attr of its integer buffers.
Invariant: compute ops keep their order; check_schedule verifies it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qvla_compiler.errors import ShapeError
from qvla_compiler.kernels.ops import LOWERINGS
from qvla_compiler.meta import STEP_BOUNDS
from qvla_compiler.passes import _graph as g

qvla = torch.ops.qvla


def lower_linears(gm: fx.GraphModule) -> fx.GraphModule:
    shared: dict[tuple, tuple[fx.Node, fx.Node]] = {}
    buffers: dict[str, fx.Node] = {}  # one get_attr per integer buffer, placed before its first reader
    dead_weights: dict[fx.Node, None] = {}  # ordered set: a weight read by several call sites is listed once
    for node in g.linear_nodes(gm):
        tensors = node.meta.get("qvla_tensors")
        if tensors is None:
            continue
        spec = node.meta["qvla"].spec
        x, w, bias = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
        key = (x, spec.a_bits, tensors.act_scale)
        with gm.graph.inserting_before(node):
            if key not in shared:
                shared[key] = _quantize_act(gm, x, spec.a_bits, tensors.act_scale)
            xq, xs = shared[key]
            wq, ws = _buffer(gm, buffers, tensors.weight), _buffer(gm, buffers, tensors.weight_scale)
            rule = LOWERINGS[spec.w_bits]
            args = (xq, xs, wq, ws, bias, *rule.extra_args(spec), node.meta["val"].dtype)
            new = gm.graph.call_function(rule.op, args)
        new.meta.update({k: v for k, v in node.meta.items()})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        dead_weights[w] = None
    for w in dead_weights:
        if not w.users:
            gm.graph.erase_node(w)
            if not any(n.op == "get_attr" and n.target == w.target for n in gm.graph.nodes):
                _delete_attr(gm, w.target)
    g.fill_values(gm)  # the quantize_act, getitem and buffer nodes above: hoisting reads their shapes
    gm.graph.lint()
    gm.recompile()
    return gm


def _buffer(gm: fx.GraphModule, buffers: dict[str, fx.Node], target: str) -> fx.Node:
    if target not in buffers:
        buffers[target] = gm.graph.get_attr(target)
    return buffers[target]


def _quantize_act(gm: fx.GraphModule, x: fx.Node, bits: int, static: str | None) -> tuple[fx.Node, fx.Node]:
    # Placed right after x (after the time input too, for a per-step table) so every consumer sees it defined.
    per_step = static is not None and getattr(gm, static).numel() > 1
    anchor = g.after_inputs(gm, x, g.time_input(gm)) if per_step else x
    with gm.graph.inserting_after(anchor):
        scale = gm.graph.get_attr(static) if static else None
    if per_step:  # a per-step table: pick the step's scale from t
        scale = _step_scale(gm, x, scale)
    with gm.graph.inserting_after(scale if scale is not None else x):
        q = gm.graph.call_function(qvla.quantize_act.default, (x, bits, scale))
    with gm.graph.inserting_after(q):
        xq = gm.graph.call_function(operator.getitem, (q, 0))
    with gm.graph.inserting_after(xq):
        xs = gm.graph.call_function(operator.getitem, (q, 1))
    return xq, xs


def _step_scale(gm: fx.GraphModule, x: fx.Node, table: fx.Node) -> fx.Node:
    t, x_val = g.time_input(gm), x.meta.get("val")
    t_val = t.meta.get("val") if t is not None else None
    if t is None or not hasattr(gm, STEP_BOUNDS) or x_val is None or t_val is None:
        raise ShapeError(f"{x.name} has a per-step activation scale table but the graph lacks its time input or "
                         f"{STEP_BOUNDS}; apply the plan with pipeline.apply")
    if t_val.dim() > 0 and str(x_val.shape[0]) != str(t_val.numel()):
        raise ShapeError(f"{x.name} of shape {tuple(x_val.shape)} does not lead with the batch of the time input "
                         f"{tuple(t_val.shape)}, so its flow step per row is unknown; use act_mode 'static'")
    with gm.graph.inserting_after(table):
        bounds = gm.graph.get_attr(STEP_BOUNDS)
    with gm.graph.inserting_after(bounds):
        return gm.graph.call_function(qvla.step_scale.default, (table, bounds, t, x_val.dim()))


def _delete_attr(gm: fx.GraphModule, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, name)
