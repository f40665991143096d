"""Check that lowering preserved the operator schedule.

Before/after: unchanged graph (a check, not a rewrite).
Rule:   drop the qvla:: quantize/rotate/step-scale ops and their getitems, map each qvla:: linear back to aten.linear; the
        remaining sequence of call_function targets must equal the one recorded at capture
        (`gm.meta["qvla_schedule"]`, taken by `record_schedule`). A violation raises ScheduleError.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from qvla_compiler.errors import ScheduleError
from qvla_compiler.kernels.ops import QVLA_LINEAR_NAMES

SCHEDULE_KEY = "qvla_schedule"
_TRANSPARENT_PREFIXES = ("qvla.quantize_act", "qvla.hadamard", "qvla.block_rotate", "qvla.step_scale")
_LINEAR_OPS = QVLA_LINEAR_NAMES


def compute_schedule(gm: fx.GraphModule) -> list[str]:
    names = []
    dropped: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if name.startswith(_TRANSPARENT_PREFIXES):
            dropped.add(node)
            continue
        if node.target is operator.getitem and node.args[0] in dropped:
            continue
        names.append(str(torch.ops.aten.linear.default) if name.startswith(_LINEAR_OPS) else name)
    return names


def record_schedule(gm: fx.GraphModule) -> fx.GraphModule:
    gm.meta[SCHEDULE_KEY] = compute_schedule(gm)
    return gm


def check_schedule(gm: fx.GraphModule) -> fx.GraphModule:
    expected, got = gm.meta.get(SCHEDULE_KEY), compute_schedule(gm)
    if expected is None:
        raise ScheduleError("no schedule was recorded for this graph; run record_schedule right after capture")
    if got != expected:
        i = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        raise ScheduleError(
            f"the lowered graph no longer computes the original sequence of ops: at position {i} expected "
            f"{expected[i:i + 3]} but found {got[i:i + 3]} ({len(expected)} ops before, {len(got)} after). "
            "A pass reordered, dropped or added compute; report this as a bug.")
    return gm
