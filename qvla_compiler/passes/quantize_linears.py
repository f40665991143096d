"""Quantize the weights of integer linears and fix their activation scales.

Before: linears with a spec, observers (calibrated) on their inputs.
After:  for each such linear, integer weights and fp32 scales are buffers on the graph module, named in
        LinearInfo.tensors; static activation scales (act_mode "static") come from the observer. The graph's
        nodes are unchanged: lower_linears does the rewrite.
Invariant: dequantize_weight(tensors) reproduces W up to the quantization grid; nothing else changes.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from qvla_compiler.kernels.ops import qmax_for
from qvla_compiler.meta import update
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.insert_observers import observer_of
from qvla_compiler.quantizers import quantize_weight

STATIC_PERCENTILE = 99.9  # of per-token absmax: one outlier token does not set the whole tensor's scale


@dataclasses.dataclass(frozen=True)
class QuantTensors:
    """Names of the buffers on the graph module that hold one linear's integer form."""

    weight: str
    weight_scale: str
    act_scale: str | None = None


def quantize_linears(gm: fx.GraphModule) -> fx.GraphModule:
    for node in g.linear_nodes(gm):
        info = node.meta["qvla"]
        if not info.is_quantized:
            continue
        spec = info.spec
        w = _fetch(gm, node.args[1])
        wq, ws = quantize_weight(w, spec.w_bits, spec.group_size, spec.weight_clip)
        if info.out_scale is not None:  # folded per-channel factors (ATM α, OHB β) ride on the dequant scale
            ws = ws * torch.tensor(info.out_scale, dtype=ws.dtype).reshape(-1, *([1] * (ws.dim() - 1)))
        base = "qvla_" + info.module_path.replace(".", "_")
        gm.register_buffer(base + "_wq", wq)
        gm.register_buffer(base + "_ws", ws)
        act = None
        if spec.act_mode == "static":
            obs = observer_of(node, gm)
            gm.register_buffer(base + "_xs", obs.tensor_scale(qmax_for(spec.a_bits), STATIC_PERCENTILE))
            act = base + "_xs"
        node.meta["qvla_tensors"] = QuantTensors(base + "_wq", base + "_ws", act)
    return gm


def _fetch(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj
