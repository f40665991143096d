"""The user-facing verbs: quantize a policy (or module), save the program, load it anywhere."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.export import Dim

from qvla_compiler import atm_ohb
from qvla_compiler.errors import ArtifactError, CalibrationError
from qvla_compiler.calibrate import check_batches
from qvla_compiler.export import OBS_KEYS, capture_module, capture_policy, widen_batch
from qvla_compiler.pipeline import run_pipeline
from qvla_compiler.program import Program, with_noise
from qvla_compiler.recipes import QuantRecipe, resolve_recipe
from qvla_compiler.protocol import is_policy
from qvla_compiler.inspect.report import Report, collect_warnings, output_fidelity

DEFAULT_RECIPE = "quantvla-w8a8"
FORMAT_VERSION = 1
_EXTRA = ("qvla/meta.json", "qvla/report.json", "qvla/plan.json")


@dataclasses.dataclass
class QuantizedProgram:
    """A quantized policy: run it (`.module()`), inspect it (`.report`, `.plan`), ship it (`.save`)."""

    program: Program
    recipe: QuantRecipe
    report: Report
    plan: list[dict]
    example_args: tuple = ()  # what save() traces the whole program with

    def module(self) -> nn.Module:
        """Policy: forward(images, tokens, token_mask, state, noise) -> actions. Module: the forward graph."""
        return self.program.as_module()

    def save(self, path: str | os.PathLike) -> Path:
        """Write a self-describing `.pt2` (torch.export.save; integer weights, scales and plan inside).

        Saving the same program twice writes identical bytes. The file appears at `path` only when complete: an
        interrupted save (exception, Ctrl-C) removes its temp file, and the next save removes those of killed runs.
        """
        path = Path(path)
        mod, args = self.module(), self.example_args
        shapes = tuple({0: Dim("batch", min=1, max=1024)} for _ in args) if self.program.is_policy else None
        with torch.no_grad():
            ep = torch.export.export(mod, args, dynamic_shapes=shapes, strict=False)
        meta = {"format": FORMAT_VERSION, "kind": "policy" if self.program.is_policy else "module",
                "inputs": list(OBS_KEYS) + ["noise"] if self.program.is_policy else None,
                "recipe": dataclasses.asdict(self.recipe)}
        extra = {"qvla/meta.json": json.dumps(meta, default=str), "qvla/report.json": self.report.to_json(),
                 "qvla/plan.json": json.dumps(self.plan)}
        from qvla_compiler.artifact import write_archive  # torch's serde imports dynamo: ~2 s, only when used

        return write_archive(ep, path, extra)  # byte-reproducible; atomic; no temp file survives


@dataclasses.dataclass
class LoadedProgram:
    """A program read back by `load`: the torch.export program plus the report, plan and meta saved with it."""

    exported_program: torch.export.ExportedProgram
    report: Report
    plan: list[dict]
    meta: dict

    def module(self) -> nn.Module:
        return self.exported_program.module()


def quantize(module: nn.Module, example_inputs: Any, calib: Iterable | Any = None,
             recipe: str | QuantRecipe | None = None, *, layout: str | None = None, calib_steps: int = 8,
             seed: int = 0, progress: bool = True, model_name: str | None = None,
             dump_dir: str | None = None, plan=None, input_roles: dict[str, str] | None = None) -> QuantizedProgram:
    """Quantize a VLA policy (qvla_compiler.protocol.VLAPolicy: embed_prefix, denoise_step, schedule, …) or a
    plain module.

    Example::

        policy = qvla_compiler.models.build_policy("pi05-tiny")
        qp = qvla_compiler.quantize(policy, policy.example_inputs(), policy.calibration_batches(8), "w8a8")
        actions = qp.module()(*obs_and_noise)
        qp.save("pi05-w8a8.pt2")

    Policy: `example_inputs` is an observation dict (images, tokens, token_mask, state) and `calib` an iterable
    of such dicts (default: the policy's own calibration_batches(calib_steps, seed)) or a forward_loop(run)
    callable. Module: `example_inputs` is a tuple of arguments (or one tensor) and `calib` an iterable of such
    tuples; outputs may be any pytree of tensors (tuples of K/V caches, dicts): fidelity is measured over all
    its leaves. `input_roles` (modules only) names what the forward's inputs are (see export.capture_module).
    A module with embed_prefix and denoise_step but not the other VLAPolicy members raises ProtocolError.
    `plan` (a QuantPlan or a plan folder, see qvla_compiler.plan) skips calibration: its decisions, integer
    weights and scales are used as they are, and its recipe is the one compiled (`recipe` defaults to
    "quantvla-w8a8", or to the plan's; a different recipe or layout beside a plan is a PlanError).
    """
    recipe, plan = _recipe_and_plan(recipe, layout, plan)
    module = module.eval()
    as_policy = is_policy(module, need_calibration=calib is None and plan is None)
    check_batches(calib, example_inputs)  # a wrong batch fails here, not after capture
    if as_policy:
        return _quantize_policy(module, example_inputs, calib, recipe, calib_steps, seed, progress, model_name,
                                dump_dir, plan)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return _quantize_module(module, args, calib, recipe, progress, model_name, dump_dir, plan, input_roles)


def _recipe_and_plan(recipe, layout, plan):
    """The recipe to compile with. A plan fixes it: a `recipe` or `layout` that differs from the plan's would be
    ignored and mislabel the program, so it is a PlanError."""
    if plan is None:
        return resolve_recipe(recipe or DEFAULT_RECIPE, layout), None
    from qvla_compiler.plan import PlanError, as_plan

    plan = as_plan(plan)
    planned = plan.recipe_object()
    asked = resolve_recipe(recipe or planned, layout)
    if (asked.name, asked.layout) != (planned.name, planned.layout):
        raise PlanError(f"the plan was calibrated with recipe {planned.name} (layout {planned.layout}) but "
                        f"{asked.name} (layout {asked.layout}) was asked for; drop recipe/layout to use the plan's, "
                        "or calibrate a new plan")
    return planned, plan


def _quantize_policy(policy, obs, calib, recipe, calib_steps, seed, progress, model_name, dump_dir, plan=None):
    noise = policy.example_noise(next(iter(obs.values())).shape[0], seed=seed)
    program = Program(capture_policy(policy, obs, noise), policy.schedule)
    if calib is None:
        calib = policy.calibration_batches(calib_steps, seed=seed)
    if not callable(calib):
        calib = with_noise(calib, tuple(noise.shape[1:]), seed)
    if recipe.atm or recipe.ohb:  # ATM/OHB teacher: the float graphs on the very inputs and noise the student sees
        calib = atm_ohb.collect_batches(calib)
        teacher = atm_ohb.observe_teacher(program, recipe, calib)
    rows, float_bytes = run_pipeline(program, recipe, calib, calib_total=calib_steps, progress=progress,
                                     dump_dir=dump_dir, plan=plan)
    scales = None
    if recipe.atm or recipe.ohb:  # student statistics from the lowered graphs; α/β folded, no op added
        scales = atm_ohb.match_attention_scales(program, recipe, calib, teacher, atm_ohb.resolve_style(recipe, policy))
    with torch.no_grad():
        ref = policy.sample_actions(*(obs[k] for k in OBS_KEYS), noise=noise)
    out = program.run((obs, noise))
    name = model_name or type(policy).__name__
    example = widen_batch((*(obs[k] for k in OBS_KEYS), noise))  # what save re-exports with: batch >= 2
    return _finish(program, recipe, rows, float_bytes, name, ref, out, example, attention_scales=scales)


def _quantize_module(module, args, calib, recipe, progress, model_name, dump_dir, plan=None, input_roles=None):
    if calib is None and plan is None:
        raise CalibrationError("a plain module needs calibration data: pass calib=[args_tuple, ...]")
    program = Program(capture_module(module, args, input_roles=input_roles))
    rows, float_bytes = run_pipeline(program, recipe, calib, progress=progress, dump_dir=dump_dir, plan=plan)
    with torch.no_grad():
        ref = module(*args)
    return _finish(program, recipe, rows, float_bytes, model_name or type(module).__name__, ref, program.run(args), args)


def _finish(program, recipe, rows, float_bytes, name, ref, out, example_args,
            attention_scales=None) -> QuantizedProgram:
    integer = [r for r in rows if r.bits != "float"]
    after = float_bytes - sum(r.bytes_bf16 for r in integer) + sum(r.bytes_quant for r in integer)
    rel, sqnr = output_fidelity(ref, out)  # over every tensor leaf of the output, concatenated
    report = Report(name, recipe.name, recipe.layout, tuple(rows), float_bytes, after, round(rel, 6),
                    round(sqnr, 2), attention_scales, collect_warnings(rows, recipe.layout, program.is_policy))
    plan = [{"graph": r.graph, "module_path": r.module_path, "region": r.region, "role": r.role, "bits": r.bits}
            for r in rows]
    return QuantizedProgram(program, recipe, report, plan, tuple(example_args))


def load(path: str | os.PathLike, *, trust: bool = False) -> LoadedProgram:
    """Load a program written by QuantizedProgram.save. Needs only `import qvla_compiler` (which registers
    the qvla:: ops).

    Data only: tensors, JSON and a weights_only pickle of the sample inputs are read; an archive holding anything
    that would run code on load (a pickled object, a native library, an eval'd expression, a graph calling a
    Python function) raises ArtifactError before any of it runs. `trust=True` skips these checks and loads with
    torch.export.load; use it only for files you wrote yourself.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no program at {path}; write one with `qvla quantize --out {path}`")
    from qvla_compiler.artifact import read_archive  # torch's serde imports dynamo: ~2 s, only when used

    ep, extra = read_archive(path, _EXTRA, trust=trust)
    if not extra.get("qvla/meta.json"):
        raise ArtifactError(f"{path} is a torch.export program but not a qvla_compiler one (no qvla/meta.json); "
                            "write one with `qvla quantize`")
    try:
        meta = json.loads(extra["qvla/meta.json"])
        fmt = meta.get("format")
        if fmt == FORMAT_VERSION:
            return LoadedProgram(ep, Report.from_json(extra["qvla/report.json"]), json.loads(extra["qvla/plan.json"]),
                                 meta)
    except Exception as exc:  # noqa: BLE001 - damaged or hand-edited JSON
        raise ArtifactError(f"{path} has unreadable qvla metadata ({type(exc).__name__}: {str(exc)[:200]}); "
                            "re-create it with `qvla quantize`") from exc
    raise ArtifactError(f"{path} has program format {fmt!r}; this qvla_compiler reads {FORMAT_VERSION}. "
                        "Re-run `qvla quantize` with this version.")
