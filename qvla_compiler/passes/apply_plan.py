"""Apply a saved QuantPlan's decisions instead of the recipe's layout (the plan replaces apply_layout).

Before: linears classified (role, region) by classify_linears / assign_regions.
After:  every linear's region, role, spec, out_scale, rotation label and kept-float reason are the plan's entry for
        its module path; the graph is
        unchanged. A linear the plan does not know, a plan entry no graph uses, or a weight of another shape or
        value than the plan was calibrated on raises PlanError naming them.
Why:    calibration decided once; recompiling must not re-derive (and possibly change) any decision.
"""
from __future__ import annotations

import torch.fx as fx

from qvla_compiler.meta import Region, Role, update
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.quantize_linears import KEPT_FLOAT, KeptFloat, _fetch
from qvla_compiler.plan import PlanError, QuantPlan, check_fingerprint


def apply_plan(gm: fx.GraphModule, plan: QuantPlan, graph: str) -> fx.GraphModule:
    """Set every linear's decisions in `gm` (graph `graph` of the program) from `plan`; see the module docstring."""
    linears = g.linear_nodes(gm)
    unknown = [n.meta["qvla"].module_path for n in linears if n.meta["qvla"].module_path not in plan.modules]
    if unknown:
        raise PlanError(f"graph {graph!r} has {len(unknown)} of {len(linears)} linear(s) the plan does not cover: "
                        f"{', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}. The plan was made for another "
                        f"model ({plan.model}); re-run `qvla calibrate` for this one")
    sites: dict[str, int] = {}  # module path → call sites seen so far in this graph
    for node in linears:
        entry = plan.modules[node.meta["qvla"].module_path]
        site = sites[entry.module_path] = sites.get(entry.module_path, -1) + 1
        per_site = entry.extra.get("site_regions", {}).get(graph)  # only where a shared weight's sites differ
        region = per_site[site] if per_site else entry.region
        if node.args[1].op == "get_attr":  # a weight computed in the graph has no fixed value to compare
            check_fingerprint(entry, _fetch(gm, node.args[1]), f"graph {graph!r}")
        out_scale = entry.extra.get("out_scale")
        update(node, region=Region(region), role=Role(entry.role), spec=entry.spec,
               out_scale=tuple(out_scale) if out_scale is not None else None, rotation=entry.extra.get("rotation"))
        if entry.extra.get("kept_float"):
            node.meta[KEPT_FLOAT] = KeptFloat(entry.extra["kept_float"])
    return gm
