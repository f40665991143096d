"""Quantize the weights of integer linears and fix their activation scales.

Before: linears with a spec, observers (calibrated) on their inputs.
After:  for each distinct weight read by integer linears, one integer weight and one scale buffer on the graph
        module; every call site of that weight names them in node.meta["qvla_tensors"] (QuantTensors). Static
        activation scales (act_mode "static": [1]; "per_step": [S], one per flow-step bucket, in graphs with a time
        input) come from each call site's own observer, so call sites fed different inputs keep different scales.
        The graph's nodes are unchanged: lower_linears does the rewrite.
Decides first: a linear whose weight or bias is computed from graph inputs (not a buffer), or whose weight is shared
        with a call site the layout keeps float, stays float; the reason is recorded as KeptFloat in
        node.meta[KEPT_FLOAT] and reported.
Weights: round to nearest (absmax or MSE clip), or GPTQ (`weight_method="gptq"`) on the input Hessian the observer
        accumulated; the integer format is the same.
Measures each integer call site's output SQNR on its observer's sample (node.meta[SITE_SQNR]) while the float weight
        still exists: in consume mode (a FloatWeightRelease) each float weight is released as soon as every integer
        call site reading it, in any graph of the program, has its integer copy.
Invariant: dequantize_weight(tensors) reproduces W up to the quantization grid; a weight is quantized once.
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qvla_compiler.errors import QvlaError
from qvla_compiler.kernels.cpu_gemm import uncached_weights
from qvla_compiler.kernels.ops import LOWERINGS, qmax_for, quantize_act
from qvla_compiler.meta import STEP_BOUNDS, update
from qvla_compiler.passes import _graph as g
from qvla_compiler.passes.fold_computed_weights import FOLDED_FROM
from qvla_compiler.passes.insert_observers import observer_of
from qvla_compiler.quant.gptq import factor_hessian, gptq_quantize
from qvla_compiler.quant.quantizers import quantize_weight, sqnr_db
from qvla_compiler.quant.released import release, storage_key
from qvla_compiler.quant.step_scales import bucket_of

STATIC_MODES = ("static", "per_step")  # activation modes whose scales come from calibration
KEPT_FLOAT = "qvla_kept_float"
SITE_SQNR = "qvla_sqnr_db"  # node.meta: float | None, the integer call site's output SQNR on its sample
GPTQ_OPTIONS = dict(clip="mse", refit_scales=True, damp=0.01)  # see _quantize_weight


class WeightNotBufferError(QvlaError, TypeError):
    """A linear's weight is not a tensor attribute of the graph module, so it cannot be read or quantized."""


@dataclasses.dataclass(frozen=True)
class QuantTensors:
    """Names of the buffers on the graph module that hold one linear's integer form."""

    weight: str
    weight_scale: str
    act_scale: str | None = None


@dataclasses.dataclass(frozen=True)
class KeptFloat:
    """Why a linear the layout made integer stays float."""

    reason: str


def quantize_linears(gm: fx.GraphModule, weight_method: str = "rtn", step_bounds: torch.Tensor | None = None,
                     progress: bool = False, release: FloatWeightRelease | None = None) -> fx.GraphModule:
    """`step_bounds`: the flow-step buckets (quant/step_scales.py) for act_mode "per_step"; `progress`: a bar over
    the integer linears (GPTQ takes minutes at full size); `release`: free float weights as they are done with."""
    keep_unquantizable_float(gm)
    weights: dict[tuple, tuple[str, torch.Tensor]] = {}  # (weight target, weight spec) → (buffer base, scale)
    scales: dict[tuple, str] = {}  # (weight target, weight spec, out_scale) → dequant scale buffer
    integer = [node for node in g.linear_nodes(gm) if node.meta["qvla"].is_quantized]
    last_factor: dict = {}  # GPTQ: the latest observer's factorised Hessian
    for node in tqdm(integer, desc=f"quantizing weights ({weight_method})", unit="linear", disable=not progress,
                     leave=False):
        info = node.meta["qvla"]
        spec = info.spec
        key = (node.args[1].target, spec.w_bits, spec.group_size, spec.weight_clip)
        if key not in weights:  # one integer weight per weight tensor, however many call sites read it
            wq, ws = _quantize_weight(gm, node, weight_method, last_factor)
            base = _free(gm, "qvla_" + re.sub(r"\W", "_", info.module_path), "_wq")
            gm.register_buffer(base + "_wq", wq)
            weights[key] = (base, ws)
        base, ws = weights[key]
        if (*key, info.out_scale) not in scales:
            if info.out_scale is not None:  # folded per-channel factors (ATM α, OHB β) ride on the dequant scale
                factors = torch.tensor(info.out_scale, dtype=torch.float64).reshape(-1, *([1] * (ws.dim() - 1)))
                ws = (ws.double() * factors).to(ws.dtype)  # one rounding, as fold_attention_scales does
            scales[(*key, info.out_scale)] = _register(gm, _free(gm, base, "_ws") + "_ws", ws)
        act = None
        scale = _act_scale(observer_of(node, gm), spec, step_bounds) if spec.act_mode in STATIC_MODES else None
        if scale is not None:  # per call site: each one's observer saw its own inputs
            act = _register(gm, _free(gm, base, "_xs") + "_xs", scale)
            if scale.numel() > 1 and not hasattr(gm, STEP_BOUNDS):  # a per-step table: its buckets, once per graph
                gm.register_buffer(STEP_BOUNDS, step_bounds.clone())
        node.meta["qvla_tensors"] = QuantTensors(base + "_wq", scales[(*key, info.out_scale)], act)
        node.meta[SITE_SQNR] = site_sqnr(gm, node)
        if release is not None:
            release.site_done(gm, node)
    return gm


class FloatWeightRelease:
    """Consume mode's bookkeeping over all graphs of a program: a float weight read only as the weight of integer
    call sites is released (quant/released.py) once the last of them is quantized, so the float and integer copies of
    the model never coexist. A weight anything else reads (a float linear, the embedding lookup of a tied weight,
    a graph output) is kept. Made before rotation and smoothing, it counts the policy's own weights; the transformed
    copy a site is quantized from (read by that site alone) is released as soon as the site is done. A parameter the
    graph reads only through folded copies (fold_computed_weights: a transpose, a cast, a slice) is released with the
    last of them."""

    def __init__(self, graphs):
        self.pending: dict[int, int] = {}  # storage → integer call sites not yet quantized
        self.tensors: dict[int, dict[int, torch.Tensor]] = {}  # storage → every tensor object over it
        self.read: dict[fx.Node, int] = {}  # integer call site → storage of the weight it read when counted
        self.sources: dict[int, list[torch.Tensor]] = {}  # folded buffer's storage → the parameters it came from
        kept, folds = set(), {}  # folds: a source parameter's storage → the folded buffers made from it
        for gm in graphs:
            for node, t in ((n, _fetch(gm, n)) for n in gm.graph.nodes if n.op == "get_attr"):
                if not isinstance(t, torch.Tensor):  # a submodule (a higher-order op's body)
                    continue
                key = storage_key(t)
                self.tensors.setdefault(key, {})[id(t)] = t
                integer = [_is_integer_weight_read(user, node) for user in node.users]
                self.read.update((user, key) for user, yes in zip(node.users, integer) if yes)
                self.pending[key] = self.pending.get(key, 0) + sum(integer)
                if not all(integer):  # also read by something else: never released
                    kept.add(key)
                for source in node.meta.get(FOLDED_FROM, ()):
                    folds.setdefault(storage_key(source), (source, set()))[1].add(key)
        for key in kept:
            self.pending.pop(key, None)
        for source, made in folds.values():  # a source read directly, or folded into a kept buffer, stays
            if storage_key(source) not in self.tensors and not made & kept:
                for key in made:
                    self.sources.setdefault(key, []).append(source)
        self.folds_left = {storage_key(s): len(made) for s, made in folds.values()}

    def site_done(self, gm: fx.GraphModule, node: fx.Node) -> None:
        weight, key = _fetch(gm, node.args[1]), self.read.get(node)
        if key is not None and storage_key(weight) != key and len(node.args[1].users) == 1:  # its own rotated copy
            release(weight)
        if key in self.pending:
            self.pending[key] -= 1
            if not self.pending[key]:
                del self.pending[key]
                for t in self.tensors.pop(key).values():
                    release(t)
                for source in self.sources.pop(key, ()):  # the last copy made from it is released: so is it
                    self.folds_left[storage_key(source)] -= 1
                    if not self.folds_left[storage_key(source)]:
                        release(source)


def _is_integer_weight_read(user: fx.Node, attr: fx.Node) -> bool:
    return (g.is_linear(user) and user.meta["qvla"].is_quantized and user.args[1] is attr
            and sum(a is attr for a in (*user.args, *user.kwargs.values())) == 1)


def site_sqnr(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """Output SQNR of the integer linear vs float on the observer's calibration sample."""
    obs = observer_of(node, gm)
    if obs is None or obs.sample is None or node.meta.get("qvla_tensors") is None:
        return None
    x = obs.sample
    w = _fetch(gm, node.args[1])
    b = _fetch(gm, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
    with torch.no_grad(), uncached_weights():  # a one-off call: caching would keep an fp32 copy of every weight
        return round(sqnr_db(torch.nn.functional.linear(x, w.float(), None if b is None else b.float()),
                             _integer_output(gm, node, x, b)), 2)


def _integer_output(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    spec, tensors = node.meta["qvla"].spec, node.meta["qvla_tensors"]
    static = getattr(gm, tensors.act_scale) if tensors.act_scale else None
    if static is not None and static.numel() > 1:  # a per-step table: the scale of the sample's flow step
        step = bucket_of(torch.tensor([observer_of(node, gm).sample_time]), getattr(gm, STEP_BOUNDS))
        static = static[step]
    xq, xs = quantize_act(x, spec.a_bits, static)
    wq, ws = getattr(gm, tensors.weight), getattr(gm, tensors.weight_scale)
    rule = LOWERINGS[spec.w_bits]
    return rule.op(xq, xs, wq, ws, b, *rule.extra_args(spec), torch.float32)


def _act_scale(observer, spec, step_bounds: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 [1] static scale, or [S] per flow step; None (dynamic per token) under per_step for an input that had no
    flow time: per-step scales are for the action head, whose range drifts with t, not the prefix — a static prefix at
    4 bits cost 14-17 points of closed-loop success (benchmarks/RESULTS.md §13)."""
    qmax = qmax_for(spec.a_bits)
    if spec.act_mode == "per_step":
        return observer.step_scales(qmax, step_bounds) if step_bounds is not None else None
    return observer.tensor_scale(qmax)


def _quantize_weight(gm: fx.GraphModule, node: fx.Node, method: str, last_factor: dict):
    """RTN, or GPTQ on the Hessian the call site's observer accumulated (of the rotated/smoothed input when a
    rotation is on: this runs after phase 2b). Call sites sharing a weight use the first one's Hessian.
    GPTQ always picks each group's scale by the MSE clip search (on the error-updated weights as the sweep reaches
    the group) and then re-solves the scales by least squares on the Hessian with the integers fixed
    (GPTQ_OPTIONS; benchmarks/RESULTS.md §11). On pi05-small quantvla-w4a8 that took the summed layer output
    error from 0.260 to 0.214 (absmax scales; act order: < 1% either way) and the action rel-L2 from 0.119 to 0.104."""
    spec, w = node.meta["qvla"].spec, _fetch(gm, node.args[1])
    if method == "gptq":
        factor = _factor(observer_of(node, gm), last_factor)
        return gptq_quantize(w, factor, spec.w_bits, spec.group_size, **GPTQ_OPTIONS)
    return quantize_weight(w, spec.w_bits, spec.group_size, spec.weight_clip)


def _factor(observer, last: dict):
    """The observer's Hessian factorised once for the linears that read it; q/k/v and gate/up come one after another,
    so `last` keeps only the latest (a K×K factor is 4 GB at K = 16384)."""
    if last.get("observer") is not observer:
        last.clear()  # the previous factor is freed before the next is made
        last.update(observer=observer, factor=factor_hessian(observer.hessian_mean(), GPTQ_OPTIONS["damp"]))
    return last["factor"]


def keep_unquantizable_float(gm: fx.GraphModule) -> None:
    """Decide, before any buffer is made, which integer linears cannot be integer; record why."""
    sites: dict[str, list[fx.Node]] = {}
    for node in g.linear_nodes(gm):
        w = node.args[1]
        if w.op == "get_attr":
            sites.setdefault(w.target, []).append(node)
        if not node.meta["qvla"].is_quantized:
            continue
        reason = _computed_reason(node)
        if reason is not None:
            _keep_float(node, reason)
    for target, nodes in sites.items():
        integer = [n for n in nodes if n.meta["qvla"].is_quantized]
        if integer and len(integer) < len(nodes):
            floats = ", ".join(sorted({n.meta["qvla"].module_path + f" ({n.name})" for n in nodes
                                       if n not in integer}))
            for node in integer:
                _keep_float(node, f"its weight {target} is shared with call site(s) the layout keeps float: "
                                  f"{floats}; give every call site the same role/region (role_overrides / "
                                  "region_overrides) to quantize it")


def _computed_reason(node: fx.Node) -> str | None:
    operands = [("weight", node.args[1]), ("bias", node.args[2] if len(node.args) > 2 else None)]
    for what, operand in operands:
        if isinstance(operand, fx.Node) and operand.op != "get_attr":
            how = "graph inputs" if not g.is_constant(operand) else "parameters, and was not folded"
            return (f"its {what} is computed from {how} (by {operand.name}); only constant weights can be "
                    "integer (run fold_computed_weights first for weights made from parameters)")
    return None


def _keep_float(node: fx.Node, reason: str) -> None:
    update(node, spec=None)
    node.meta[KEPT_FLOAT] = KeptFloat(reason)


def _free(gm: fx.GraphModule, base: str, suffix: str) -> str:
    """`base`, or `base_1`, `base_2`, … : the first name whose `name + suffix` is not taken on `gm`."""
    name, i = base, 0
    while hasattr(gm, name + suffix):
        i += 1
        name = f"{base}_{i}"
    return name


def _register(gm: fx.GraphModule, name: str, value: torch.Tensor) -> str:
    gm.register_buffer(name, value)
    return name


def _fetch(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        what = node.name if isinstance(node, fx.Node) else repr(node)
        raise WeightNotBufferError(
            f"expected a tensor attribute of the graph module, got {what} (computed in the graph); run "
            "fold_computed_weights before this pass, or keep the linear float")
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj
