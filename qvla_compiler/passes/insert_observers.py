"""Insert one observer per activation that feeds integer linears.

Before: x → linear(x, W) for linears whose spec is set (possibly several linears reading the same x).
After:  x → obs_i(x) → linear(obs_i(x), W): `obs_i` is a call_module node of an ActObserver (identity), shared by
        all integer linears reading x, so q/k/v (and gate/up) see one set of statistics. In a graph with a flow-time
        input t (a denoise step) every observer is obs_i(x, t), so statistics can be kept per step.
Invariant: the program computes exactly what it computed before (observers return their input).
"""
from __future__ import annotations

import torch.fx as fx

from qvla_compiler.quant.observers import ActObserver
from qvla_compiler.passes import _graph as g

OBSERVER_PREFIX = "qvla_observer_"


def insert_observers(gm: fx.GraphModule) -> fx.GraphModule:
    readers: dict[fx.Node, list[fx.Node]] = {}
    for node in g.linear_nodes(gm):
        if node.meta["qvla"].is_quantized:
            readers.setdefault(node.args[0], []).append(node)
    t = g.time_input(gm)
    for i, (x, linears) in enumerate(readers.items()):
        name = f"{OBSERVER_PREFIX}{i}"
        gm.add_submodule(name, ActObserver(", ".join(n.meta["qvla"].module_path for n in linears)))
        with gm.graph.inserting_after(x if t is None else g.after_inputs(gm, x, t)):
            obs = gm.graph.call_module(name, (x,) if t is None else (x, t))
        obs.meta["val"] = x.meta.get("val")
        for lin in linears:
            lin.replace_input_with(x, obs)
    gm.recompile()
    return gm


def observer_of(node: fx.Node, gm: fx.GraphModule) -> ActObserver | None:
    """The observer feeding linear `node`, if any."""
    x = node.args[0]
    if x.op == "call_module" and str(x.target).startswith(OBSERVER_PREFIX):
        return gm.get_submodule(x.target)
    return None


def remove_observers(gm: fx.GraphModule, prefix: str = OBSERVER_PREFIX) -> fx.GraphModule:
    """Inverse of insert_observers: bypass and delete every identity observer whose name starts with `prefix`."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(prefix):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    gm.recompile()
    return gm
