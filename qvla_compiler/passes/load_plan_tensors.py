"""Attach a plan's integer weights and scales to the graph (the plan replaces observe → calibrate → quantize).

Before: linears whose spec was set by apply_plan; no observers, no quantized buffers.
After:  the same buffers quantize_linears would have made (`qvla_<path>_wq`, `_ws`, `_xs`), copied from the plan,
        and node.meta["qvla_tensors"] naming them; the graph's nodes are unchanged, lower_linears does the rewrite.
Invariant: a program built from a plan is bit-identical to the one the plan was read from.
"""
from __future__ import annotations

import torch.fx as fx

from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.quantize_linears import QuantTensors
from qvla_compiler.plan import WEIGHT_Q, WEIGHT_SCALE, PlanError, QuantPlan


def load_plan_tensors(gm: fx.GraphModule, plan: QuantPlan, graph: str) -> fx.GraphModule:
    for node in g.linear_nodes(gm):
        info = node.meta["qvla"]
        if not info.is_quantized:
            continue
        entry = plan.modules[info.module_path]
        if WEIGHT_Q not in entry.tensors or WEIGHT_SCALE not in entry.tensors:
            raise PlanError(f"the plan marks {info.module_path} as {info.bits_label} but holds no integer weight")
        base = "qvla_" + info.module_path.replace(".", "_")
        gm.register_buffer(base + "_wq", entry.tensors[WEIGHT_Q].clone())
        gm.register_buffer(base + "_ws", entry.tensors[WEIGHT_SCALE].clone())
        act = None
        if info.spec.act_mode == "static":
            scale = entry.act_scale(graph)
            if scale is None:
                raise PlanError(f"{info.module_path} uses static activation scales but the plan has none for "
                                f"graph {graph!r}")
            gm.register_buffer(base + "_xs", scale.clone())
            act = base + "_xs"
        node.meta["qvla_tensors"] = QuantTensors(base + "_wq", base + "_ws", act)
    return gm
