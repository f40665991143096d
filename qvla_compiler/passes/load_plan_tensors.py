"""Attach a plan's tensors to the graph: its integer weights and scales, and each group's fitted transforms.

Before: linears whose decisions were set by apply_plan; observers (never run) on integer linears' inputs.
After:  the buffers quantize_linears would have made (`qvla_<path>_wq`, `_ws`, `_xs`), copied from the plan, named in
        node.meta["qvla_tensors"]; each observed group's GroupTransform (SmoothQuant s, DuQuant Λ, R₁, P, R₂) from
        its first linear's entry, for rotate_and_smooth. The graph's nodes are unchanged.
Invariant: a program built from a plan is bit-identical to any other built from the same plan.
"""
from __future__ import annotations

import torch.fx as fx

from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.quantize_linears import QuantTensors
from qvla_compiler.passes.record_plan import planned_transform
from qvla_compiler.passes.rotate_common import observed_groups, set_group_transform
from qvla_compiler.plan import WEIGHT_Q, WEIGHT_SCALE, PlanError, QuantPlan


def load_plan_tensors(gm: fx.GraphModule, plan: QuantPlan, graph: str) -> fx.GraphModule:
    sites: dict[str, int] = {}  # module path → call sites seen so far (record_plan counts them the same way)
    for node in g.linear_nodes(gm):
        info = node.meta["qvla"]
        site = sites[info.module_path] = sites.get(info.module_path, -1) + 1
        if info.is_quantized:
            _attach_integer(gm, node, plan.modules[info.module_path], graph, site)
    for obs_node, _, linears in observed_groups(gm):
        fields = planned_transform(plan.modules[linears[0].meta["qvla"].module_path])
        if fields:
            set_group_transform(obs_node, **fields)
    return gm


def _attach_integer(gm: fx.GraphModule, node: fx.Node, entry, graph: str, site: int) -> None:
    info = node.meta["qvla"]
    if WEIGHT_Q not in entry.tensors or WEIGHT_SCALE not in entry.tensors:
        raise PlanError(f"the plan marks {info.module_path} as {info.bits_label} but holds no integer weight")
    base = "qvla_" + info.module_path.replace(".", "_")
    gm.register_buffer(base + "_wq", entry.tensors[WEIGHT_Q].clone())
    gm.register_buffer(base + "_ws", entry.tensors[WEIGHT_SCALE].clone())
    act = None
    if info.spec.act_mode == "static":
        scale = entry.act_scale(graph, site)
        if scale is None:
            raise PlanError(f"{info.module_path} uses static activation scales but the plan has none for call "
                            f"site {site} of graph {graph!r}")
        act = base + ("_xs" if site == 0 else f"_{site}_xs")
        gm.register_buffer(act, scale.clone())
    node.meta["qvla_tensors"] = QuantTensors(base + "_wq", base + "_ws", act)
