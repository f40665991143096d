"""The compiler, phase by phase: analyse → observe and calibrate → quantize → lower → check.

Set `QVLA_DUMP=<dir>` (or pass dump_dir) to write every graph's code after each phase as `<phase>-<graph>.py`.
"""
from __future__ import annotations

import dataclasses
import os

from qvla_compiler.calibrate import calibrate
from qvla_compiler.lowering import lower_linears
from qvla_compiler.passes import (apply_layout, assign_regions, check_schedule, classify_linears, insert_observers,
                                  quantize_linears, record_schedule, remove_observers)
from qvla_compiler.passes.check_accumulator_bounds import check_accumulator_bounds
from qvla_compiler.passes.rotate_and_smooth import needs_rotation, replayable, rotate_and_smooth
from qvla_compiler.program import Program
from qvla_compiler.recipes import QuantRecipe
from qvla_compiler.inspect.report import LinearReport, linear_reports, param_bytes


def run_pipeline(program: Program, recipe: QuantRecipe, calib, *, calib_total: int | None = None,
                 progress: bool = True, dump_dir: str | None = None, plan=None) -> tuple[list[LinearReport], int]:
    """Quantize `program`'s graphs in place; returns the per-linear report rows and the float bf16 bytes.
    With a QuantPlan (`plan`), its decisions and integer tensors replace layout, calibration and quantization."""
    if plan is not None:
        return run_planned(program, recipe, plan, dump_dir=dump_dir)
    graphs, dump = program.graphs, _dumper(dump_dir or os.environ.get("QVLA_DUMP"))
    dump("0-captured", graphs)

    # Phase 1: analyse — decide what every linear is and whether it becomes integer (annotations only).
    for gm in graphs.values():
        record_schedule(gm)
        classify_linears(gm, recipe.role_overrides)
        assign_regions(gm, recipe.region_overrides)
        apply_layout(gm, recipe)
    dump("1-analysed", graphs)

    # Phase 2: observe and calibrate — identity observers on integer linears' inputs, then run the data.
    calib = replayable(calib, recipe)
    for gm in graphs.values():
        insert_observers(gm)
    calibrate(program, calib, total=calib_total, progress=progress)
    dump("2-observed", graphs)

    # Phase 2b: rotate and smooth — exact float rewrites fitted on the observers (an online qvla:: op or a folded
    # norm gain on each input, the inverse folded into the weights), then re-observe the transformed inputs.
    if needs_rotation(recipe):
        for gm in graphs.values():
            rotate_and_smooth(gm, recipe)
        calibrate(program, calib, total=calib_total, progress=progress)
        dump("2b-rotated", graphs)

    # Phase 3: quantize — integer weights and scales as buffers; measure each linear's SQNR on its sample.
    for gm in graphs.values():
        quantize_linears(gm)
    rows = [row for name, gm in graphs.items() for row in linear_reports(name, gm)]
    float_bytes = param_bytes(graphs.values())

    # Phase 4: lower — observers out, qvla:: ops in; the operator schedule must be the original one.
    for gm in graphs.values():
        remove_observers(gm)
        check_accumulator_bounds(gm)  # int32 accumulators proved safe or K-split recorded; refuses what cannot split
        lower_linears(gm)
        check_schedule(gm)
    dump("4-lowered", graphs)
    return rows, float_bytes


def _dumper(directory: str | None):
    from qvla_compiler.inspect.trace import trace_phase  # files under directory; TORCH_TRACE artifacts when set

    def dump(phase: str, graphs) -> None:
        trace_phase(phase, graphs, directory)
    return dump


def run_planned(program: Program, recipe: QuantRecipe, plan, *, dump_dir: str | None = None):
    """run_pipeline with a saved QuantPlan: the same phases, minus observe/calibrate (calibrated once, elsewhere)."""
    from qvla_compiler.passes.apply_plan import apply_plan
    from qvla_compiler.passes.load_plan_tensors import load_plan_tensors

    plan.require_replayable()
    graphs, dump = program.graphs, _dumper(dump_dir or os.environ.get("QVLA_DUMP"))
    dump("0-captured", graphs)
    # Phase 1: analyse, then take every decision from the plan instead of the layout.
    for name, gm in graphs.items():
        record_schedule(gm)
        classify_linears(gm, recipe.role_overrides)
        assign_regions(gm, recipe.region_overrides)
        apply_plan(gm, plan, name)
    dump("1-analysed", graphs)
    # Phase 3: the plan's integer weights and scales; per-linear SQNR is the one measured at calibration.
    for name, gm in graphs.items():
        load_plan_tensors(gm, plan, name)
    rows = [dataclasses.replace(r, sqnr_db=plan.modules[r.module_path].extra.get("sqnr_db") if r.bits != "float"
                                else r.sqnr_db)
            for name, gm in graphs.items() for r in linear_reports(name, gm)]
    float_bytes = param_bytes(graphs.values())
    # Phase 4: lower and check, exactly as without a plan.
    for gm in graphs.values():
        check_accumulator_bounds(gm)
        lower_linears(gm)
        check_schedule(gm)
    dump("4-lowered", graphs)
    return rows, float_bytes
