"""Attach a plan's tensors to the graph: its integer weights and scales, and each group's fitted transforms.

Before: linears whose decisions were set by apply_plan; observers (never run) on integer linears' inputs.
After:  the buffers quantize_linears would have made (`qvla_<path>_wq`, `_ws`, `_xs`), the plan's own tensors (shared,
        not copied: passes never write a tensor in place, fold_attention_scales clones what it scales), named in
        node.meta["qvla_tensors"] (a per-step scale table [S] also registers the plan's step bounds as
        `qvla_step_bounds`, once per graph); each observed group's GroupTransform (SmoothQuant s, DuQuant Λ, R₁, P, R₂) from
        its first linear's entry, for rotate_and_smooth. The graph's nodes are unchanged.
Invariant: a program built from a plan is bit-identical to any other built from the same plan.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from qvla_compiler.meta import STEP_BOUNDS
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.quantize_linears import STATIC_MODES, QuantTensors
from qvla_compiler.passes.record_plan import planned_transform
from qvla_compiler.passes.rotate_common import observed_groups, set_group_transform
from qvla_compiler.plan import WEIGHT_Q, WEIGHT_SCALE, PlanError, QuantPlan


def load_plan_tensors(gm: fx.GraphModule, plan: QuantPlan, graph: str) -> fx.GraphModule:
    sites: dict[str, int] = {}  # module path → call sites seen so far (record_plan counts them the same way)
    for node in g.linear_nodes(gm):
        info = node.meta["qvla"]
        site = sites[info.module_path] = sites.get(info.module_path, -1) + 1
        if info.is_quantized:
            _attach_integer(gm, node, plan.modules[info.module_path], graph, site, plan.step_bounds)
    for obs_node, _, linears in observed_groups(gm):
        fields = planned_transform(plan.modules[linears[0].meta["qvla"].module_path])
        if fields:
            set_group_transform(obs_node, **fields)
    return gm


def _attach_integer(gm: fx.GraphModule, node: fx.Node, entry, graph: str, site: int, plan_bounds) -> None:
    info = node.meta["qvla"]
    if WEIGHT_Q not in entry.tensors or WEIGHT_SCALE not in entry.tensors:
        raise PlanError(f"the plan marks {info.module_path} as {info.bits_label} but holds no integer weight")
    base = "qvla_" + info.module_path.replace(".", "_")
    gm.register_buffer(base + "_wq", entry.tensors[WEIGHT_Q])  # shared: a copy would hold every integer weight twice
    gm.register_buffer(base + "_ws", entry.tensors[WEIGHT_SCALE])
    act = None
    # per_step: only inputs that see the flow time have tables; the others (the prefix) quantize dynamically
    if info.spec.act_mode in STATIC_MODES and (info.spec.act_mode == "static" or g.time_input(gm) is not None):
        scale = entry.act_scale(graph, site)
        if scale is None:
            raise PlanError(f"{info.module_path} uses static activation scales but the plan has none for call "
                            f"site {site} of graph {graph!r}")
        if scale.numel() > 1:
            _require_step_input(gm, info.module_path, plan_bounds)
        act = base + ("_xs" if site == 0 else f"_{site}_xs")
        gm.register_buffer(act, scale)
    node.meta["qvla_tensors"] = QuantTensors(base + "_wq", base + "_ws", act)



def _require_step_input(gm: fx.GraphModule, module_path: str, bounds: list[float] | None) -> None:
    """Per-step scale tables need the graph's time input and the plan's bounds; register the bounds once."""
    if g.time_input(gm) is None or bounds is None:
        raise PlanError(f"the plan gives {module_path} one activation scale per flow step, but this graph has no "
                        "input tagged as the flow time (or the plan no step bounds); compile the denoise step "
                        "through qvla_compiler.quantize / `qvla quantize`, or calibrate with act_mode 'static'")
    if not hasattr(gm, STEP_BOUNDS):
        gm.register_buffer(STEP_BOUNDS, torch.tensor(bounds, dtype=torch.float32))
