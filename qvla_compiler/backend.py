"""`torch.compile(model, backend="qvla", options={"plan": plan_or_folder})`: a QuantPlan applied to Dynamo graphs.

Dynamo hands over a torch-IR graph whose parameters are inputs (nn modules are inlined; placeholder
`L_self_modules_layers_modules_0_modules_mlp_modules_up_parameters_weight_`). Each parameter's name is decoded to a
module path (`layers.0.mlp.up`) and matched to the plan (exactly, or as a dotted suffix when the compiled callable wraps
the planned model). The graph is then captured like any module — torch.export with those parameters as named
constants, the same canonical passes — and the plan is applied by `pipeline.apply`, the one path every program is
built by: layout, rotations and smoothing, integer weights, ATM/OHB, for every recipe. The lowered graph goes to
Inductor (`compile_fx`), which keeps the qvla:: custom ops as calls. Run it under `torch.no_grad()`.

Example::

    plan = QuantPlan.load("plan/")  # from `qvla calibrate --model pi05-tiny --recipe w8a8 --out plan/`
    step = torch.compile(policy.denoise_step, backend="qvla", options={"plan": plan}, fullgraph=True)
    be = qvla_compiler.backend(plan=plan)  # or keep the object to read what matched
    step = torch.compile(policy.denoise_step, backend=be); step(prefix, x, t); print(be.summary())
"""
from __future__ import annotations

import dataclasses
import logging
import operator
import re
import sys
import types
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch.nn import functional as F

from qvla_compiler import pipeline
from qvla_compiler.plan import PlanError, QuantPlan, as_plan

log = logging.getLogger(__name__)
_LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
_SOURCE_SPLIT = re.compile(r"_(?:modules|parameters|buffers)_")


@dataclasses.dataclass
class GraphMatch:
    """What the backend did with one Dynamo graph."""

    index: int
    linears: int = 0
    unmatched: list[str] = dataclasses.field(default_factory=list)  # not in the plan: stay float
    quantized: list[str] = dataclasses.field(default_factory=list)
    kept_float: list[str] = dataclasses.field(default_factory=list)  # in the plan, decided float

    def line(self) -> str:
        text = (f"qvla graph {self.index}: {self.linears} linears, {len(self.quantized)} integer from the plan, "
                f"{len(self.kept_float)} float by the plan, {len(self.unmatched)} not in the plan")
        if self.unmatched:
            text += f" ({', '.join(self.unmatched[:6])}{' …' if len(self.unmatched) > 6 else ''})"
        return text


class QvlaBackend:
    """A torch.compile backend bound to one plan. `strict=True` fails on any linear the plan does not cover;
    `inductor=False` returns the rewritten graph module itself (eager, for debugging)."""

    def __init__(self, plan: QuantPlan | str, *, strict: bool = False, inductor: bool = True):
        self.plan, self.strict, self.inductor = as_plan(plan), strict, inductor
        self.graphs: list[GraphMatch] = []
        self.graph_modules: list[fx.GraphModule] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        from qvla_compiler.export import capture_dynamo_graph

        captured = capture_dynamo_graph(gm, example_inputs, self.plan)
        match = GraphMatch(len(self.graphs), len(captured.linears), unmatched=captured.unmatched)
        self.graphs.append(match)
        log.info(match.line())
        if len(self.graphs) > 1:
            log.info("qvla: %d graphs so far — a graph break split the callable (see TORCH_LOGS=graph_breaks)",
                     len(self.graphs))
        if match.unmatched and (self.strict or len(match.unmatched) == match.linears):
            raise PlanError(f"{match.line()}. The plan ({self.plan.model}) does not fit this model: plan paths look "
                            f"like {next(iter(self.plan.modules), '?')!r}, graph weights like "
                            f"{match.unmatched[0]!r}")
        if match.unmatched:
            warnings.warn(match.line(), stacklevel=2)
        program = captured.program
        applied = pipeline.apply(program, captured.plan)
        match.quantized = [r.module_path for r in applied.rows if r.bits != "float"]
        match.kept_float = [r.module_path for r in applied.rows if r.bits == "float"
                            and r.module_path not in captured.unmatched]
        lowered = next(iter(program.graphs.values()))
        self.graph_modules.append(lowered)
        compiled = lowered
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(lowered, list(captured.user_inputs))
        return captured.wrap(compiled)

    def summary(self) -> str:
        return "\n".join(m.line() for m in self.graphs) or "qvla: nothing compiled yet"


def backend(plan: QuantPlan | str | None = None, **options) -> QvlaBackend:
    """The qvla backend as an object: `torch.compile(fn, backend=qvla_compiler.backend(plan=...))`."""
    if plan is None:
        raise PlanError("the qvla backend needs a plan: backend(plan=QuantPlan.load('plan/')) or a plan folder")
    return QvlaBackend(plan, **options)


def qvla_backend(gm: fx.GraphModule, example_inputs: list[torch.Tensor], options: dict | None = None, **_: Any):
    """Entry point for `torch.compile(..., backend="qvla", options={"plan": ..., "strict": ...})`."""
    options = dict(options or {})
    plan = options.pop("plan", None)
    if plan is None:
        raise PlanError('backend="qvla" needs a plan: torch.compile(fn, backend="qvla", options={"plan": "plan/"}) '
                        "(write one with `qvla calibrate`)")
    return backend(plan, **options)(gm, example_inputs)


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    # When torch found our `torch_dynamo_backends` entry point, its lookup registers us right after this import.
    if "qvla" not in _COMPILER_FNS and _BACKENDS.get("qvla") is None:
        register_backend(name="qvla")(qvla_backend)


class _CallableModule(types.ModuleType):
    """`qvla_compiler.backend` is this module and also `backend(plan=...)`: the entry point needs the module path."""

    def __call__(self, plan: QuantPlan | str | None = None, **options) -> QvlaBackend:
        return backend(plan, **options)


_register()
sys.modules[__name__].__class__ = _CallableModule
