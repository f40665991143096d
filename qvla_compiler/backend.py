"""`torch.compile(model, backend="qvla", options={"plan": plan_or_folder})`: a QuantPlan applied to Dynamo graphs.

Dynamo hands over a torch-IR graph: `torch._C._nn.linear(x, w, b)` calls whose weights are graph inputs (nn modules
are inlined; placeholder `L_self_modules_layers_modules_0_modules_mlp_modules_up_parameters_weight_`) or get_attr
nodes. Each weight's name is decoded to a module path (`layers.0.mlp.up`), matched to the plan (exactly, or as a
dotted suffix when the compiled callable wraps the planned model), and the matched integer linears become

    xq, xs = qvla::quantize_act(x, a_bits, static_scale)      — shared by linears reading the same x
    y      = qvla::int8_linear / int4_linear(xq, xs, Wq, Ws, b, …)

with the plan's integer weights as constants; the rewritten graph goes to Inductor (`compile_fx`), which keeps the
qvla:: custom ops as calls. Run the compiled callable under `torch.no_grad()` (the qvla:: ops have no backward).

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

from qvla_compiler.lowering.lower_linears import LOWERINGS
from qvla_compiler.plan import ModulePlan, PlanError, QuantPlan, as_plan, check_fingerprint

log = logging.getLogger(__name__)
_LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
_SOURCE_SPLIT = re.compile(r"_(?:modules|parameters|buffers)_")


@dataclasses.dataclass
class GraphMatch:
    """What the backend did with one Dynamo graph."""

    index: int
    linears: int = 0
    quantized: list[str] = dataclasses.field(default_factory=list)
    kept_float: list[str] = dataclasses.field(default_factory=list)  # in the plan, decided float
    unmatched: list[str] = dataclasses.field(default_factory=list)  # not in the plan: stay float

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
        self.plan.require_replayable()
        self.graphs: list[GraphMatch] = []
        self.graph_modules: list[fx.GraphModule] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        match = apply_plan_to_dynamo_graph(gm, self.plan, example_inputs, index=len(self.graphs))
        self.graphs.append(match)
        self.graph_modules.append(gm)
        log.info(match.line())
        if len(self.graphs) > 1:
            log.info("qvla: %d graphs so far — a graph break split the callable (see TORCH_LOGS=graph_breaks)",
                     len(self.graphs))
        if match.unmatched and (self.strict or not match.quantized and not match.kept_float):
            raise PlanError(f"{match.line()}. The plan ({self.plan.model}) does not fit this model: plan paths look "
                            f"like {next(iter(self.plan.modules), '?')!r}, graph weights like "
                            f"{match.unmatched[0]!r}")
        if match.unmatched:
            warnings.warn(match.line(), stacklevel=2)
        if not self.inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

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


def apply_plan_to_dynamo_graph(gm: fx.GraphModule, plan: QuantPlan, example_inputs=(), index: int = 0) -> GraphMatch:
    """Rewrite every planned integer linear of a Dynamo torch-IR graph into qvla:: ops, in place."""
    match, shared = GraphMatch(index), {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = {p: t for p, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor) and not _is_fake(t)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
            continue
        match.linears += 1
        name = weight_name(gm, node)
        entry = _lookup(plan, name)
        if entry is None:
            match.unmatched.append(name)
            continue
        if not entry.is_quantized:
            match.kept_float.append(entry.module_path)
            continue
        weight = real.get(node.args[1], node.args[1].meta.get("example_value"))
        if weight is not None and not _is_fake(weight):
            check_fingerprint(entry, weight, f"Dynamo graph {index}")
        elif weight is not None:
            _check_shape(entry, weight)
        _rewrite(gm, node, entry, shared)
        match.quantized.append(entry.module_path)
    if match.quantized and hasattr(gm, "_param_name_to_source"):
        # AOTAutograd checks every get_attr tensor against Dynamo's sources; ours are constants no user code owns,
        # so let it treat the graph like an exported one (constants become static inputs).
        del gm._param_name_to_source
    gm.graph.lint()
    gm.recompile()
    return match


def weight_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """Dotted module path of a linear's weight, decoded from its Dynamo source name."""
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    raw = str(w.target)
    if w.op == "get_attr":
        return gm.meta.get("dynamo_flat_name_to_original_fqn", {}).get(raw, raw).removesuffix(".weight")
    parts = _SOURCE_SPLIT.split(raw.strip("_").removeprefix("L_").removeprefix("l_"))
    return ".".join(parts[1:]).removesuffix(".weight")  # parts[0] is the local name (`self`, `model`)


def _lookup(plan: QuantPlan, path: str) -> ModulePlan | None:
    if path in plan.modules:
        return plan.modules[path]
    hits = [m for p, m in plan.modules.items() if path.endswith("." + p) or p.endswith("." + path)]
    return hits[0] if len(hits) == 1 else None


def _rewrite(gm: fx.GraphModule, node: fx.Node, entry: ModulePlan, shared: dict) -> None:
    spec, graph = entry.spec, gm.graph
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    base = "qvla_" + entry.module_path.replace(".", "_")
    gm.register_buffer(base + "_wq", entry.tensors["weight_q"].clone())
    gm.register_buffer(base + "_ws", entry.tensors["weight_scale"].clone())
    static = entry.act_scale() if spec.act_mode == "static" else None
    if static is not None:
        gm.register_buffer(base + "_xs", static.clone())
    key = (x, spec.a_bits, base + "_xs" if static is not None else None)
    with graph.inserting_before(node):
        if key not in shared:
            scale = graph.get_attr(key[2]) if key[2] else None
            q = graph.call_function(torch.ops.qvla.quantize_act.default, (x, spec.a_bits, scale))
            shared[key] = (graph.call_function(operator.getitem, (q, 0)), graph.call_function(operator.getitem, (q, 1)))
        xq, xs = shared[key]
        rule = LOWERINGS[spec.w_bits]
        dtype = node.meta["example_value"].dtype if "example_value" in node.meta else torch.float32
        new = graph.call_function(rule.op, (xq, xs, graph.get_attr(base + "_wq"), graph.get_attr(base + "_ws"), bias,
                                            *rule.extra_args(spec), dtype))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _check_shape(entry: ModulePlan, w) -> None:
    if tuple(w.shape) != (entry.out_features, entry.in_features):
        raise PlanError(f"the plan's {entry.module_path} is [{entry.out_features}, {entry.in_features}] but the "
                        f"compiled model's weight is {list(w.shape)}: the plan was made for another model")


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
