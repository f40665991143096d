"""`torch.compile(model, backend="qvla", options={"plan": plan_or_folder})`: a QuantPlan applied to Dynamo graphs.

Dynamo hands over a torch-IR graph whose parameters are inputs (nn modules are inlined; placeholder
`L_self_modules_layers_modules_0_modules_mlp_modules_up_parameters_weight_`). Each parameter's name is decoded to a
module path (`layers.0.mlp.up`) and matched to the plan (exactly, or as a dotted suffix when the compiled callable wraps
the planned model). The graph is then captured like any module — torch.export with those parameters as named
constants, the same canonical passes — and the plan is applied by `pipeline.apply`, the one path every program is
built by: layout, rotations and smoothing, integer weights, ATM/OHB, for every recipe. The lowered graph goes to
Inductor (`compile_fx`) with the qvla:: ops' CPU decompositions registered (kernels/inductor.py), so they fuse with
their neighbours as in `compile_program`. Run it under `torch.no_grad()`. When Dynamo makes sizes symbolic (its second
batch size, or dynamic=True), the backend builds one program per concrete shape at its first call.

Example::

    plan = QuantPlan.load("plan/")  # from `qvla calibrate --model pi05-tiny --recipe w8a8 --out plan/`
    step = torch.compile(policy.denoise_step, backend="qvla", options={"plan": plan}, fullgraph=True)
    be = qvla_compiler.backend(plan=plan)  # or keep the object to read what matched
    step = torch.compile(policy.denoise_step, backend=be); step(prefix, x, t); print(be.summary())
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
import sys
import types
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qvla_compiler import pipeline
from qvla_compiler.export import ROLE_BY_ARG_NAME, capture_module
from qvla_compiler.meta import INPUTS_KEY
from qvla_compiler.plan import ModulePlan, PlanError, QuantPlan, as_plan, weight_fingerprint
from qvla_compiler.program import Program

log = logging.getLogger(__name__)
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
        if any(isinstance(v, torch.SymInt) for v in example_inputs):  # Dynamo made sizes symbolic (a 2nd batch)
            return self._per_shape(gm)
        return self._compile(gm, example_inputs)

    def _per_shape(self, gm: fx.GraphModule):
        """A Dynamo graph with symbolic sizes: one integer program per concrete shape, built at its first call (as
        torch.compile(dynamic=False) would recompile), since capture and the plan's static scales need real sizes."""
        programs = {}

        def run(*args):
            key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
            if key not in programs:
                programs[key] = self._compile(gm, list(args))
            return programs[key](*args)
        return run

    def _compile(self, gm: fx.GraphModule, example_inputs: list):
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

            from qvla_compiler.kernels.inductor import register
            from qvla_compiler.lowering.inductor_forms import for_inductor

            register()  # the qvla:: ops decompose into aten and fuse with their neighbours (kernels/inductor.py)
            # an exported graph's key does not pickle (closures in it): Inductor's FX cache would only log a traceback
            try:
                with torch._inductor.config.patch(fx_graph_cache=False):
                    compiled = compile_fx(for_inductor(lowered), list(captured.user_inputs))
            except Exception as exc:  # noqa: BLE001 - Inductor fails in many ways (flex_attention on CPU, no compiler)
                warnings.warn(f"qvla: Inductor could not compile graph {match.index} ({type(exc).__name__}: "
                              f"{str(exc).strip()[:300]}); running the rewritten integer graph eagerly instead (same "
                              "results, slower)", RuntimeWarning, stacklevel=2)
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


# ------------------------------------------------------------------------------------------- capturing a Dynamo graph
_SOURCE_SPLIT = re.compile(r"_(?:modules|parameters|buffers)_")


@dataclasses.dataclass
class DynamoCapture:
    """A Dynamo graph captured like any module: its parameters named by module path, ready for pipeline.apply."""

    program: Any  # Program with one graph, named after the plan graph its linears come from
    plan: Any  # the plan, plus float entries for linears it does not cover
    linears: list[str]
    unmatched: list[str]
    user_inputs: tuple
    user_index: list[int]

    def wrap(self, fn):
        """`fn` takes the user inputs only; Dynamo calls with parameters too."""
        index = self.user_index

        def run(*args):
            return fn(*[args[i] for i in index])
        return run


def capture_dynamo_graph(gm: fx.GraphModule, example_inputs, plan) -> DynamoCapture:
    """Export a Dynamo torch-IR graph with its parameter inputs as constants named by (plan) module path."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params, user_index = {}, []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        fqn = _source_fqn(str(node.target)) if _SOURCE_SPLIT.search(str(node.target)) else None
        if fqn is None or not isinstance(value, torch.Tensor):
            user_index.append(i)
        else:
            params[i] = _plan_fqn(fqn, plan, value)
    holder = _ParameterHolder(_real_autocast(gm), {i: (fqn, example_inputs[i]) for i, fqn in params.items()},
                              len(placeholders))
    user = tuple(example_inputs[i] for i in user_index)
    graph = capture_module(holder, user, dynamic_batch=False)["forward"]
    _tag_time_input(graph, [str(placeholders[i].target) for i in user_index])
    linears = [n.args[1].target.removesuffix(".weight") for n in graph.graph.nodes
               if n.op == "call_function" and n.target is torch.ops.aten.linear.default and n.args[1].op == "get_attr"]
    unmatched = [p for p in linears if p not in plan.modules]
    counts = collections.Counter(g for p in linears if p in plan.modules for g in plan.modules[p].graphs)
    name = counts.most_common(1)[0][0] if counts else "forward"
    extra = {}
    for path in unmatched:
        out_f, in_f = _attr(graph, path + ".weight").shape
        extra[path] = ModulePlan(path, "backbone", "other", in_f, out_f, None, (name,))
    full = QuantPlan(plan.model, plan.recipe, {**plan.modules, **extra}, plan.attention, step_bounds=plan.step_bounds)
    return DynamoCapture(Program({name: graph}), full, linears, unmatched, user, user_index)


def _tag_time_input(graph: fx.GraphModule, names: list[str]) -> None:
    """Dynamo names a user input after its local variable (`L_t_`): tag the flow time as capture_policy does, so
    per-step activation scales find it. Other inputs keep their roles (the plan decides regions)."""
    roles = list(graph.meta.get(INPUTS_KEY, ()))
    if len(roles) != len(names):
        return
    for j, raw in enumerate(names):
        local = _SOURCE_SPLIT.split(raw.strip("_").removeprefix("L_").removeprefix("l_"))[0].lower()
        if ROLE_BY_ARG_NAME.get(local) == "time":
            roles[j] = "time"
    graph.meta[INPUTS_KEY] = tuple(roles)


def _source_fqn(raw: str) -> str:
    """`L_self_modules_layers_modules_0_modules_up_parameters_weight_` → `layers.0.up.weight`."""
    parts = _SOURCE_SPLIT.split(raw.strip("_").removeprefix("L_").removeprefix("l_"))
    return ".".join(parts[1:])  # parts[0] is the local name (`self`, `model`)


def _plan_fqn(fqn: str, plan, value: torch.Tensor) -> str:
    """The tensor's name with its module path as the plan spells it: exact, a unique dotted-suffix match, or for a
    weight Dynamo names after another module (tied: the LM head's weight is `embed_tokens.weight` there) the one
    plan entry with its shape and float fingerprint."""
    module, _, attr = fqn.rpartition(".")
    if module in plan.modules:
        return fqn
    hits = [p for p in plan.modules if module.endswith("." + p) or p.endswith("." + module)]
    own = any(p.startswith(module + ".") for p in plan.modules)  # a weight folded under its module (GPT-2's Conv1D)
    if not hits and not own and attr == "weight" and value.dim() == 2:
        shape, print_ = list(value.shape), weight_fingerprint(value)
        hits = [p for p, e in plan.modules.items() if [e.out_features, e.in_features] == shape
                and e.extra.get("fingerprint") == print_]
    return f"{hits[0]}.{attr}" if len(hits) == 1 else fqn


def _attr(module: nn.Module, fqn: str):
    for part in fqn.split("."):
        module = getattr(module, part)
    return module


def _enter_real_autocast(device_type, dtype, enabled, cache_enabled):
    mode = torch.autocast(device_type, dtype, enabled, cache_enabled)
    mode.__enter__()
    return mode


def _exit_real_autocast(mode) -> None:
    mode.__exit__(None, None, None)


_AUTOCAST_CALLS = {torch.amp.autocast_mode._enter_autocast: _enter_real_autocast,
                   torch.amp.autocast_mode._exit_autocast: _exit_real_autocast}


def _real_autocast(gm: fx.GraphModule) -> fx.GraphModule:
    """Dynamo spells a `with torch.autocast(...)` block as `_enter_autocast` / `_exit_autocast` calls, which under
    torch.export's tracing only record the block and leave the ops uncast (a dtype error in the first bf16 matmul).
    Entering a real autocast instead makes export see the block as user code writes it (then inline_subgraphs)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _AUTOCAST_CALLS:
            node.target = _AUTOCAST_CALLS[node.target]
    gm.recompile()
    return gm


class _ParameterHolder(nn.Module):
    """forward(*user inputs) = the Dynamo graph with its parameter inputs read from buffers named by module path."""

    def __init__(self, gm: fx.GraphModule, tensors: dict[int, tuple[str, torch.Tensor]], arity: int):
        super().__init__()
        object.__setattr__(self, "_graph", gm)  # not a submodule: its own names must not prefix the tensors
        self._slots, self._arity = {}, arity
        for i, (fqn, value) in tensors.items():
            owner, _, attr = fqn.rpartition(".")
            module = self
            for part in owner.split(".") if owner else ():
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_buffer(attr, value.detach())
            self._slots[i] = fqn

    def forward(self, *user):
        inputs, it = [], iter(user)
        for i in range(self._arity):
            inputs.append(_attr(self, self._slots[i]) if i in self._slots else next(it))
        return self._graph(*inputs)


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
