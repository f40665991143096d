"""The compiler in two verbs: calibrate a QuantPlan on data, then apply it. Applying a plan is the only way a program
is built (`quantize` = apply ∘ calibrate; `--plan` and the torch.compile backend apply a saved one).

calibrate, on a fork:  (layout "auto": measure each linear's action error per weight width, allocate the widths)
  0 teacher (ATM/OHB: attention statistics of the float graphs) → 1 analyse (roles, regions,
  layout) → 2 observe → 2b fit rotations/smoothing, rewrite, observe again → 3 quantize → the plan → (tune_steps:
  fit the plan's weight scales to the float program's outputs) → 5 match attention: apply the plan to another fork
  (the student), α/β from teacher vs student, into the plan.
apply, pure rewriting:  1 analyse, decisions from the plan → 2 the plan's tensors → 2b rotate/smooth from the plan
  → 4 lower to qvla:: ops, check bounds and schedule → 5 fold the plan's α/β into existing tensors → 6 hoist what
  every denoise step recomputes from the prefix alone into the prefix, and table what it computes from its time
  alone for all the schedule's timesteps there.
Set `QVLA_DUMP=<dir>` (or pass dump_dir) to write every graph's code after each phase as `<phase>-<graph>.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import os

from qvla_compiler import calibration as cal
from qvla_compiler.inspect.phases import phase
from qvla_compiler.inspect.report import LinearReport, linear_reports, param_bytes, planned_sqnr
from qvla_compiler.inspect.trace import trace_phase
from qvla_compiler.lowering import cast_float_linears, hoist_invariants, lower_linears, table_time_values
from qvla_compiler.passes import (FloatWeightRelease, apply_layout, apply_plan, assign_regions,
                                  check_accumulator_bounds, check_schedule, classify_linears, fit_transforms,
                                  fold_attention_scales, insert_observers, keep_unquantizable_float,
                                  linear_fingerprints, load_plan_tensors, needs_rotation, quantize_linears, record_plan,
                                  record_schedule, remove_observers, reset_observers, rotate_and_smooth, track_hessians)
from qvla_compiler.errors import RecipeError
from qvla_compiler.plan import QuantPlan
from qvla_compiler.program import Program
from qvla_compiler.tuning import tune_weight_scales


def calibrate(program: Program, recipe, calib, *, model: str, atm_style=None, total: int | None = None,
              progress: bool = True, consume: bool = False) -> QuantPlan:
    """Every decision and tensor for `program` under `recipe`, fitted on `calib`; `program`'s graphs are not changed
    (`consume`: the float weights of integer linears are released as their integer copies appear, quant/released.py)."""
    if consume and recipe.tune_steps:
        raise RecipeError("scale tuning (tune_steps) compares against the float program, whose weights consume "
                          "releases: calibrate without consume, or drop '+tune'")
    if recipe.needs_bit_allocation:  # layout "auto": a weight width per linear, from its measured action error
        calib = cal.collect_batches(calib)
        recipe = cal.choose_weight_bits(program, recipe, calib, progress=progress)
    bounds = cal.flow_step_bounds(program, recipe)  # act_mode "per_step": the schedule's flow-step buckets
    same_inputs = recipe.atm or recipe.ohb or recipe.tune_steps > 0  # later phases replay the very same batches
    work, batches = program.fork(), cal.replayable(calib, needs_rotation(recipe), same_inputs)
    teacher = None
    if recipe.atm or recipe.ohb:
        with phase("calibrate: teacher"):
            teacher = cal.observe_teacher(work, recipe, batches)
    fingerprints = {}
    for gm in work.graphs.values():
        classify_linears(gm, recipe.role_overrides)
        assign_regions(gm, recipe.region_overrides)
        keep_unquantizable_float(apply_layout(gm, recipe))
        fingerprints.update(linear_fingerprints(gm))
        track_hessians(insert_observers(gm), recipe.weight_method == "gptq")
    release = FloatWeightRelease(work.graphs.values()) if consume else None  # counted before any rotation
    with phase("calibrate: observe"):
        cal.run_calibration(work, batches, total=total, progress=progress)
    if needs_rotation(recipe):
        with phase("calibrate: rotate, observe again"):
            fit_transforms(work.graphs.values(), recipe)
            for gm in work.graphs.values():
                reset_observers(rotate_and_smooth(gm, recipe))
            cal.run_calibration(work, batches, total=total, progress=progress)
    with phase("calibrate: quantize weights"):
        for gm in work.graphs.values():
            quantize_linears(gm, recipe.weight_method, bounds, progress, release)
    rows = [row for name, gm in work.graphs.items() for row in linear_reports(name, gm)]
    plan = record_plan(work.graphs, recipe, model, fingerprints, rows, bounds)
    if recipe.tune_steps:
        with phase("calibrate: tune weight scales"):  # on a fork built from the plan, not yet lowered
            student = _planned(program.fork(), plan, recipe)
            tune_weight_scales(program, student, plan, batches, recipe.tune_steps, progress=progress)
    if teacher is not None:
        with phase("calibrate: match attention"):
            student = program.fork()
            apply(student, plan, hoist=False)  # its attention observed in the graphs capture made
            plan.attention = cal.match_attention_scales(student, recipe, batches, teacher, atm_style)
    return plan


@dataclasses.dataclass
class Applied:  # per call site rows (SQNR from calibration), bf16 bytes of the float tensors, the ATM/OHB record
    rows: list[LinearReport]
    float_bytes: int
    attention: dict | None
    hoisted: list[str]  # the denoise-step values moved into the prefix (hoist_invariants, table_time_values)


def apply(program: Program, plan: QuantPlan, *, dump_dir: str | None = None, hoist: bool = True) -> Applied:
    """Rewrite `program`'s graphs in place into the plan's integer program; deterministic, reads no data."""
    recipe = plan.recipe_object()
    dump = functools.partial(trace_phase, directory=dump_dir or os.environ.get("QVLA_DUMP"))
    dump("0-captured", program.graphs)
    dump("2-planned", _planned(program, plan, recipe).graphs)
    rows = [planned_sqnr(row, plan) for name, gm in program.graphs.items() for row in linear_reports(name, gm)]
    float_bytes = param_bytes(program.graphs.values())
    for name, gm in program.graphs.items():
        remove_observers(gm)
        check_accumulator_bounds(gm)  # int32 accumulators proved safe or K-split recorded; refuses what cannot split
        lower_linears(gm)
        check_schedule(gm)
        fold_attention_scales(gm, *cal.planned_attention_scales(plan.attention, name))
        cast_float_linears(gm, recipe.float_dtype)  # the float linears (α/β folded) in bf16 if the recipe says so
    moved = _hoist(program, recipe) if hoist and program.is_policy else []
    dump("4-lowered", program.graphs)
    return Applied(rows, float_bytes, plan.attention, moved)


def _hoist(program: Program, recipe) -> list[str]:
    """Out of the denoise loop: values of the prefix alone, then values of the time alone (an fp32 GEMM over all
    timesteps may round otherwise than per step, so a float program keeps its bits: none of those move)."""
    prefix, denoise = program.graphs["prefix"], program.graphs["denoise"]
    return hoist_invariants(prefix, denoise) + table_time_values(prefix, denoise, program.schedule.timesteps,
                                                                 float_gemms=recipe.layout != "none")


def _planned(program: Program, plan: QuantPlan, recipe) -> Program:
    """Apply's 1 analyse, decisions from the plan → 2 the plan's tensors → 2b rotate/smooth, in place."""
    for name, gm in program.graphs.items():
        record_schedule(gm)
        classify_linears(gm, recipe.role_overrides)
        assign_regions(gm, recipe.region_overrides)
        insert_observers(apply_plan(gm, plan, name))
        rotate_and_smooth(load_plan_tensors(gm, plan, name), recipe)
    return program
