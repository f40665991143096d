"""Read a calibrated program's decisions and tensors into a QuantPlan (the graphs are not changed).

Before: graphs after quantize_linears: linears annotated (LinearInfo, KeptFloat), integer buffers named in
        node.meta["qvla_tensors"], observers with their samples, each observed group's GroupTransform.
After:  the same graphs; a QuantPlan entry per module path holding all of it (see plan.py), the float-weight
        fingerprints taken before any rewrite, and each call site's SQNR on its calibration sample.
Invariant: apply_plan + load_plan_tensors on a fresh capture rebuild exactly these decisions and tensors.
"""
from __future__ import annotations

import dataclasses
import json

import torch.fx as fx

from qvla_compiler.meta import LinearInfo
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.quantize_linears import KEPT_FLOAT, _fetch
from qvla_compiler.passes.rotate_common import TRANSFORM, observed_groups
from qvla_compiler.plan import (DUQUANT, SMOOTH, WEIGHT_Q, WEIGHT_SCALE, ModulePlan, QuantPlan, act_scale_key,
                                weight_fingerprint)


def linear_fingerprints(gm: fx.GraphModule) -> dict[str, list[float]]:
    """Module path → fingerprint of its float weight; take it before any pass replaces the weights."""
    return {n.meta["qvla"].module_path: weight_fingerprint(_fetch(gm, n.args[1]))
            for n in g.linear_nodes(gm) if n.args[1].op == "get_attr"}


def record_plan(graphs: dict[str, fx.GraphModule], recipe, model: str, fingerprints: dict[str, list[float]],
                rows, step_bounds=None) -> QuantPlan:
    """`rows`: the inspect.report LinearReports of `graphs` (their SQNR is kept per module path and graph);
    `step_bounds`: the flow-step buckets the per-step scale tables were calibrated on (act_mode per_step)."""
    modules: dict[str, ModulePlan] = {}
    first_sqnr: dict[tuple[str, str], float | None] = {}
    for row in rows:
        first_sqnr.setdefault((row.graph, row.module_path), row.sqnr_db)
    regions: dict[str, dict[str, list[str]]] = {}  # module path → graph → the region of each call site
    for graph, gm in graphs.items():
        sites: dict[str, int] = {}  # module path → call sites seen so far in this graph
        for node in g.linear_nodes(gm):
            info = node.meta["qvla"]
            site = sites[info.module_path] = sites.get(info.module_path, -1) + 1
            regions.setdefault(info.module_path, {}).setdefault(graph, []).append(_region(info))
            entry = modules.get(info.module_path)
            if entry is None:
                entry = modules[info.module_path] = _entry(info, node, fingerprints.get(info.module_path))
            if graph not in entry.graphs:
                entry.graphs = (*entry.graphs, graph)
                entry.extra["sqnr_db"][graph] = first_sqnr.get((graph, info.module_path))
            _collect_tensors(entry, gm, node, act_scale_key(graph, site))
        for obs_node, _, linears in observed_groups(gm):
            _collect_transform(modules[linears[0].meta["qvla"].module_path], obs_node.meta.get(TRANSFORM))
    for path, per_graph in regions.items():  # a weight shared by a backbone and an action-head pass (EO1's LM)
        if {r for sites in per_graph.values() for r in sites} != {modules[path].region}:
            modules[path].extra["site_regions"] = per_graph
    recipe_json = json.loads(json.dumps(dataclasses.asdict(recipe), default=str))
    bounds = step_bounds.tolist() if step_bounds is not None else None
    return QuantPlan(model, recipe_json, modules, step_bounds=bounds)


def _entry(info: LinearInfo, node: fx.Node, fingerprint) -> ModulePlan:
    kept = node.meta.get(KEPT_FLOAT)
    extra = {"block": info.block, "heads": info.heads, "head_dim": info.head_dim, "mlp_part": info.mlp_part,
             "rotation": info.rotation, "kept_float": kept.reason if kept else None, "sqnr_db": {}}
    if info.out_scale is not None:
        extra["out_scale"] = list(info.out_scale)
    if fingerprint is not None:
        extra["fingerprint"] = fingerprint
    return ModulePlan(info.module_path, _region(info), info.role.value,
                      info.in_features, info.out_features, info.spec, (), {}, extra)


def _region(info: LinearInfo) -> str:
    return info.region.value if info.region else "backbone"


def _collect_tensors(entry: ModulePlan, gm: fx.GraphModule, node: fx.Node, act_key: str) -> None:
    # The calibration fork's own tensors, not copies (no pass writes a tensor in place, and the fork is dropped once
    # the plan exists): a copy held every integer weight twice until then, +0.9 GB on groot-full W8A8.
    names = node.meta.get("qvla_tensors")
    if names is None:
        return
    entry.tensors.setdefault(WEIGHT_Q, getattr(gm, names.weight).detach())
    entry.tensors.setdefault(WEIGHT_SCALE, getattr(gm, names.weight_scale).detach())
    if names.act_scale:
        entry.tensors[act_key] = getattr(gm, names.act_scale).detach()


def _collect_transform(entry: ModulePlan, transform) -> None:
    if transform is None:
        return
    if transform.smooth is not None:
        entry.tensors[SMOOTH] = transform.smooth.detach().clone()
    t = transform.duquant
    if t is not None:
        values = (t.smooth, t.rot1, t.perm, t.rot2)
        entry.tensors.update({name: v.detach().clone() for name, v in zip(DUQUANT, values) if v is not None})


def planned_transform(entry: ModulePlan):
    """The GroupTransform fields a plan entry carries: {"smooth": s, "duquant": DuQuantTransform} (absent: none)."""
    from qvla_compiler.quant.duquant import DuQuantTransform

    fields = {}
    if SMOOTH in entry.tensors:
        fields["smooth"] = entry.tensors[SMOOTH]
    if DUQUANT[1] in entry.tensors:
        t = entry.tensors
        fields["duquant"] = DuQuantTransform(*(t.get(name) for name in DUQUANT))
    return fields


__all__ = ["linear_fingerprints", "planned_transform", "record_plan"]
