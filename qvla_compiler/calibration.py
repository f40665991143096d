"""Running data through programs: calibration batches (with a progress bar), and the ATM/OHB teacher and student
statistics. The math of α and β is quant.attention_scales; folding them is passes.fold_attention_scales."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qvla_compiler.errors import CalibrationError, RecipeError, ScheduleError
from qvla_compiler.kernels.cpu_gemm import uncached_weights
from qvla_compiler.kernels.ops import WEIGHT_BITS
from qvla_compiler.meta import Region
from qvla_compiler.passes import assign_regions, classify_linears, insert_observers, remove_observers, track_hessians
from qvla_compiler.passes._attention_sites import attention_sites
from qvla_compiler.passes.fold_attention_scales import alpha_target
from qvla_compiler.passes.observe_attention import (BlockStats, attention_stats, observe_attention,
                                                     remove_attention_observers)
from qvla_compiler.program import Program
from qvla_compiler.quant.step_scales import step_bounds
from qvla_compiler.quant.attention_scales import (ATM_STYLES, AtmStyle, atm_alpha,  # noqa: F401 — re-exported
                                                  ohb_beta)

SCOPE = (Region.ACTION_HEAD,)  # the paper applies ATM and OHB only in the DiT / action expert
SENSITIVITY_PROJECTIONS = 16  # backward passes of the first-order sensitivity estimate (RESULTS §20)


def run_calibration(program: Program, batches: Iterable[Any] | Callable[[Callable[[Any], Any]], None], *,
              total: int | None = None, progress: bool = True) -> int:
    """Run every batch (or call `forward_loop(run)` once) through `program`; returns the number of batches.

    `batches` is an iterable of program inputs, or a callable `forward_loop(run)` that calls `run(inputs)` itself
    (the ModelOpt style). Raises CalibrationError when no batch ran or a batch holds NaN/Inf.
    """
    count = 0

    def run(inputs):
        nonlocal count
        _check_finite(inputs, count)
        program.run(inputs, f"calibration batch {count}")
        count += 1
        bar.update(1)

    with tqdm(total=total, desc="calibrating", unit="batch", disable=not progress, leave=False) as bar:
        if callable(batches):
            batches(run)
        else:
            for inputs in batches:
                run(inputs)
    if count == 0:
        raise CalibrationError("the calibration data was empty: pass at least one batch (e.g. "
                               "policy.calibration_batches(8)) or a forward_loop that calls run(inputs)")
    return count


def check_batches(calib: Any, example: Any) -> None:
    """Before any capture: an empty list, or a listed batch whose structure, dtypes, ranks or trailing shapes differ
    from the example inputs', is a CalibrationError. Lazy iterables and forward loops are checked as they run."""
    if not isinstance(calib, (list, tuple)):
        return
    if not calib:
        raise CalibrationError("the calibration data was empty: pass at least one batch (e.g. "
                               "policy.calibration_batches(8)) or a forward_loop that calls run(inputs)")
    want, want_spec = _flat(example)
    for index, batch in enumerate(calib):
        got, spec = _flat(batch)
        if spec != want_spec:
            raise CalibrationError(f"calibration batch {index} {_structure_gap(batch, example)}; build batches "
                                   "like the example inputs")
        _check_finite(batch, index)
        for i, (g, w) in enumerate(zip(got, want)):
            if isinstance(w, torch.Tensor) and not _same_kind(g, w):
                raise CalibrationError(f"calibration batch {index}, input {i}: {_describe(g)} but the example is "
                                       f"{_describe(w)}; convert or reshape the batch to match the example inputs")


def _structure_gap(batch: Any, example: Any) -> str:
    if isinstance(batch, dict) and isinstance(example, dict):
        missing, extra = sorted(set(example) - set(batch)), sorted(set(batch) - set(example))
        return f"lacks keys {missing} and has extra keys {extra} (the example has {sorted(example)})"
    return (f"has {len(_flat(batch)[0])} inputs where the example inputs have {len(_flat(example)[0])}, or "
            "another nesting")


def _flat(tree: Any):
    tree = (tree,) if isinstance(tree, torch.Tensor) else tree
    return torch.utils._pytree.tree_flatten(tree)


def _same_kind(got: Any, want: torch.Tensor) -> bool:
    return isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.dim() == want.dim() \
        and got.shape[1:] == want.shape[1:]


def _describe(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"{str(t.dtype).replace('torch.', '')} [{'x'.join(map(str, t.shape))}]"


def _check_finite(inputs: Any, index: int) -> None:
    for leaf in torch.utils._pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
            raise CalibrationError(f"calibration batch {index} contains NaN or Inf; clean or re-normalise the data")


# ------------------------------------------------------------------------------------- ATM / OHB statistics
def flow_step_bounds(program: Program, recipe) -> torch.Tensor | None:
    """The flow-step buckets per-step scales are calibrated on (act_mode "per_step"), from the policy's schedule."""
    if recipe.act_mode != "per_step":
        return None
    if program.schedule is None:
        raise RecipeError("act_mode 'per_step' calibrates one activation scale per denoising step, from the sampler's "
                          "schedule, and a module captured on its own has none: quantize the policy (sample_actions), "
                          "or use act_mode 'static' or 'dynamic' for this module")
    return step_bounds(program.schedule.timesteps)


def resolve_style(recipe, policy=None) -> AtmStyle:
    """The recipe's ATM style ("auto": GR00T-style for GR00T policies, π0.5-style otherwise) with its overrides."""
    name = recipe.atm_style
    if name == "auto":
        from qvla_compiler.models.groot import GrootPolicy
        name = "groot" if isinstance(policy, GrootPolicy) else "pi05"
    style = ATM_STYLES[name]
    lo, hi = recipe.atm_clip if recipe.atm_clip is not None else (style.lo, style.hi)
    neutral = recipe.atm_neutral if recipe.atm_neutral is not None else style.neutral
    return AtmStyle(lo, hi, neutral, style.inclusive)


def replayable(calib: Iterable[Any] | Callable, again: bool, same_inputs: bool):
    """Calibration data that can run more than once. `same_inputs` (ATM/OHB: teacher and student must see the very
    same inputs and noise) materialises it once; `again` (rotations: fit, then observe the rotated inputs) keeps lists
    and forward loops as they are and lists a one-shot iterable."""
    if same_inputs:
        return collect_batches(calib)
    if not again or callable(calib) or isinstance(calib, (list, tuple)):
        return calib
    return list(calib)


def collect_batches(calib: Iterable[Any] | Callable) -> list:
    """Materialise calibration inputs once, so teacher, quantizer calibration and student see the very same ones."""
    if callable(calib):
        batches: list = []
        calib(batches.append)
        return batches
    return list(calib)


def observe_program(program: Program, batches: list, regions: tuple[Region, ...] | None = SCOPE
                    ) -> dict[str, dict[int, BlockStats]]:
    """Run `batches` through `program` with attention observers in place; the graphs are restored afterwards."""
    before = {name: gm.code for name, gm in program.graphs.items()}
    for gm in program.graphs.values():
        observe_attention(gm, regions)
    try:
        for inputs in batches:
            program.run(inputs)
        stats = {name: attention_stats(gm) for name, gm in program.graphs.items()}
    finally:
        for gm in program.graphs.values():
            remove_attention_observers(gm)
    _require_unchanged(program, before, "observe_attention")
    return stats


def observe_teacher(program: Program, recipe, batches: list) -> dict[str, dict[int, BlockStats]]:
    """Teacher statistics from the float (captured, not yet quantized) program; annotates its linears first."""
    for gm in program.graphs.values():
        classify_linears(gm, recipe.role_overrides)
        assign_regions(gm, recipe.region_overrides)
    return observe_program(program, batches)


def match_attention_scales(program: Program, recipe, batches: list, teacher: dict[str, dict[int, BlockStats]],
                           style: AtmStyle) -> dict:
    """Observe the lowered student, compute α/β against `teacher`; returns the record a plan carries (and the report
    shows). Folding is the plan's: pipeline.apply reads `planned_attention_scales(record, graph)`.
    The student shares the plan's integer weights, which outlive it: a cached fp32 operand per weight would stay
    resident for the rest of the compile and in the program built from the plan (the cache of RESULTS §14b)."""
    with uncached_weights():
        student = observe_program(program, batches)
    record = {"atm": recipe.atm, "ohb": recipe.ohb, "atm_style": dataclasses.asdict(style),
              "ohb_log_clip": recipe.ohb_log_clip, "ohb_neutral": recipe.ohb_neutral, "batches": len(batches),
              "graphs": {}}
    for name, gm in program.graphs.items():
        rows = []
        for site in attention_sites(gm, SCOPE):
            t, s = teacher.get(name, {}).get(site.block), student[name].get(site.block)
            if t is not None and s is not None:
                rows.append(_site_row(gm, site, t, s, recipe, style))
        if rows:
            record["graphs"][name] = rows
    return record


def planned_attention_scales(record: dict | None, graph: str) -> tuple[dict[int, list[float]], dict[int, float]]:
    """(α per block, β per block) of `graph` to fold, from a match_attention_scales record."""
    alphas, betas = {}, {}
    for row in (record or {}).get("graphs", {}).get(graph, []):
        if record["atm"] and row["alpha_fold"] in ("q_proj", "q_norm"):
            alphas[row["block"]] = row["alpha"]
        if record["ohb"] and row["o_proj"]:
            betas[row["block"]] = row["beta"]
    return alphas, betas


def _site_row(gm: fx.GraphModule, site, t: BlockStats, s: BlockStats, recipe, style: AtmStyle) -> dict:
    target = alpha_target(gm, site)
    fold = target if isinstance(target, str) else ("q_proj" if target.kind == "linear" else "q_norm")
    heads = len(t.logit_std or [])
    alpha = [1.0] * heads
    if recipe.atm and t.logit_std and s.logit_std and not isinstance(target, str):
        alpha = atm_alpha(t.logit_std, s.logit_std, style)
    beta = 1.0
    if recipe.ohb and t.energy_rms is not None and s.energy_rms is not None:
        beta = ohb_beta(t.energy_rms, s.energy_rms, recipe.ohb_log_clip, recipe.ohb_neutral)
    return {"block": site.block,
            "q_proj": [n.meta["qvla"].module_path for n in site.q_linears],
            "o_proj": [n.meta["qvla"].module_path for n in site.o_linears],
            "alpha": alpha, "beta": beta, "alpha_fold": fold,
            "logit_std_teacher": t.logit_std, "logit_std_student": s.logit_std,
            "rms_teacher": t.energy_rms, "rms_student": s.energy_rms}


def _require_unchanged(program: Program, before: dict[str, str], what: str) -> None:
    for name, gm in program.graphs.items():
        if gm.code != before[name]:
            raise ScheduleError(f"{what} left graph '{name}' changed after its observers were removed")


# ---- action-guided mixed precision (layout "auto"): measure, then allocate (quant/mixed_precision.py) -----------
def choose_weight_bits(program: Program, recipe, batches: list, *, progress: bool = True):
    """The recipe with one weight width per candidate linear (`weight_bits`), chosen for `recipe.bpw` from each
    linear's measured action error on the first calibration batch, its weight rounded as the recipe rounds it (GPTQ:
    on its input's Hessian over every calibration batch); `program` itself is not changed."""
    from qvla_compiler.passes import apply_layout
    from qvla_compiler.quant.mixed_precision import allocate_bits

    work = program.fork()
    for gm in work.graphs.values():
        classify_linears(gm, recipe.role_overrides)
        apply_layout(assign_regions(gm, recipe.region_overrides), recipe)
    hessians = _input_hessians(work, batches, progress) if recipe.weight_method == "gptq" else None
    measure = estimate_weight_sensitivity if recipe.sensitivity == "gradient" else measure_weight_sensitivity
    errors, params = measure(work, recipe, batches[0], hessians=hessians, progress=progress)
    widths = allocate_bits(errors, params, recipe.bpw)
    return recipe.with_(weight_bits=tuple(sorted(widths.items())))


def _input_hessians(program: Program, batches: list, progress: bool) -> dict[str, torch.Tensor]:
    """{module path: 2·XᵀX/n of its input on the calibration batches} for every linear the layout makes integer (the
    first call site's); the observers are removed again."""
    from qvla_compiler.passes._graph import linear_nodes
    from qvla_compiler.passes.insert_observers import observer_of

    for gm in program.graphs.values():
        track_hessians(insert_observers(gm))
    run_calibration(program, batches, progress=progress)
    hessians = {}
    for gm in program.graphs.values():
        for node in linear_nodes(gm):
            if node.meta["qvla"].is_quantized and observer_of(node, gm) is not None:
                hessians.setdefault(node.meta["qvla"].module_path, observer_of(node, gm).hessian_mean())
        remove_observers(gm)
    return hessians


def measure_weight_sensitivity(program: Program, recipe, batch, widths=WEIGHT_BITS, *, hessians=None,
                               progress: bool = True):
    """({module path: {width: action rel-L2}}, {module path: weight params}) for every linear the layout makes
    integer: the whole sampler's output error when only that linear's weight is rounded to each width (RTN with the
    recipe's group size and clip; GPTQ on `hessians[path]` when given), activations float. The weights are restored
    after each measurement. One sampler run per linear and width: `estimate_weight_sensitivity` is the fast form."""
    from qvla_compiler.passes import _graph as g

    sites = _weight_sites(program)
    ref = program.run(batch)
    errors, params = {}, {}
    for path, where in tqdm(sites.items(), desc="sensitivity", disable=not progress, unit="linear"):
        w = g.attr_tensor(*where[0])
        params[path], errors[path] = w.numel(), {}
        for bits, rounded in _roundings(w, recipe, widths, None if hessians is None else hessians[path]):
            for gm, target in where:
                g.replace_attr_tensor(gm, target, rounded)
            out = program.run(batch)
            errors[path][bits] = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
        for gm, target in where:
            g.replace_attr_tensor(gm, target, w)
    return errors, params


def estimate_weight_sensitivity(program: Program, recipe, batch, widths=WEIGHT_BITS, *, hessians=None,
                                projections: int = SENSITIVITY_PROJECTIONS, seed: int = 0x5E45,
                                progress: bool = True):
    """`measure_weight_sensitivity`'s errors to first order, from `projections` backward passes instead of a sampler
    run per linear and width. For v ~ N(0, I) shaped like the output a, E_v[(v·δa)²] = ‖δa‖², and rounding one
    linear's weight by ΔW moves v·a by ⟨ΔW, ∇_W(v·a)⟩ to first order; one backward pass gives that gradient for
    every linear at once, so the error estimate is √(mean over projections of ⟨ΔW, ∇_W(v·a)⟩²) / ‖a‖. On the small
    presets it ranks the linears as the direct measurement does (Spearman 0.96-0.99 at each width) in 3-14x less time;
    the widths it picks leave 0.3-7% more open-loop action error (benchmarks/RESULTS.md §20)."""
    from qvla_compiler.passes import _graph as g

    sites = _weight_sites(program)
    weights = {path: list({id(t): t for t in (g.attr_tensor(*site) for site in where)}.values())
               for path, where in sites.items()}  # the distinct tensors a path's call sites read
    deltas, params = {}, {}
    for path, tensors in tqdm(weights.items(), desc="rounding", disable=not progress, unit="linear"):
        w = tensors[0].detach()  # a module's parameters usually require grad
        params[path] = w.numel()
        rounded = _roundings(w, recipe, widths, None if hessians is None else hessians[path])
        deltas[path] = {bits: (r.float() - w.float()).bfloat16() for bits, r in rounded}  # bf16: 2 bytes a weight
    squares = {path: dict.fromkeys(widths, 0.0) for path in sites}  # a weight the output never reads stays at 0
    norm = 0.0
    for norm, grads in _output_gradients(program, batch, weights, projections, seed, progress):
        for path, grad in grads.items():
            for bits, delta in deltas[path].items():
                squares[path][bits] += float((delta.float() * grad).sum()) ** 2 / projections
    errors = {path: {bits: sq ** 0.5 / max(norm, 1e-12) for bits, sq in by.items()} for path, by in squares.items()}
    return errors, params


def _output_gradients(program: Program, batch, weights: dict[str, list[torch.Tensor]], projections: int, seed: int,
                      progress: bool):
    """For each of `projections` draws v ~ N(0, I) over the output's float leaves a: (‖a‖, {path: Σ over the path's
    tensors of ∇(v·a)}), from one forward pass with autograd on. Paths the output does not depend on are left out.
    The weights' requires_grad flags are restored afterwards."""
    leaves = [t for tensors in weights.values() for t in tensors]
    flags = [t.requires_grad for t in leaves]
    gen = torch.Generator().manual_seed(seed)
    try:
        for t in leaves:
            t.requires_grad_(True)
        outs = [o for o in torch.utils._pytree.tree_leaves(program.run(batch, grad=True)) if o.is_floating_point()]
        norm = float(sum(o.detach().float().pow(2).sum() for o in outs)) ** 0.5
        for r in tqdm(range(projections), desc="sensitivity", disable=not progress, unit="projection"):
            probe = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outs)
            grads = torch.autograd.grad(probe, leaves, retain_graph=r < projections - 1, allow_unused=True)
            of = {id(t): gr for t, gr in zip(leaves, grads) if gr is not None}
            yield norm, {path: sum(of[id(t)].float() for t in tensors if id(t) in of)
                         for path, tensors in weights.items() if any(id(t) in of for t in tensors)}
    finally:
        for t, flag in zip(leaves, flags):
            t.requires_grad_(flag)


def _weight_sites(program: Program) -> dict[str, list[tuple[fx.GraphModule, str]]]:
    """{module path: [(graph, get_attr target)]} of every integer linear whose weight is a graph attribute."""
    from qvla_compiler.passes import _graph as g

    sites: dict[str, list[tuple[fx.GraphModule, str]]] = {}
    for gm in program.graphs.values():
        for node in g.linear_nodes(gm):
            if node.meta["qvla"].is_quantized and node.args[1].op == "get_attr":
                sites.setdefault(node.meta["qvla"].module_path, []).append((gm, node.args[1].target))
    return sites


def _roundings(w: torch.Tensor, recipe, widths, hessian: torch.Tensor | None):
    """(width, w as the recipe rounds it at that width, in w's dtype) for each width: RTN with the recipe's group
    size and clip, or GPTQ on `hessian` (factorised once for every width)."""
    from qvla_compiler.passes.quantize_linears import GPTQ_OPTIONS
    from qvla_compiler.quant.gptq import factor_hessian, gptq_quantize
    from qvla_compiler.quant.quantizers import dequantize_weight, quantize_weight

    factor = None
    for bits in widths:
        if hessian is None:
            q, s = quantize_weight(w, bits, recipe.group_size, recipe.weight_clip)
        else:
            factor = factor or factor_hessian(hessian, GPTQ_OPTIONS["damp"])
            q, s = gptq_quantize(w, factor, bits, recipe.group_size, **GPTQ_OPTIONS)
        yield bits, dequantize_weight(q, s, bits, w.shape[1], recipe.group_size).to(w.dtype)

