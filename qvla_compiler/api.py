"""The user-facing verbs: quantize a policy (or module), save the program, load it anywhere."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from qvla_compiler import calibration, pipeline
from qvla_compiler.errors import ArtifactError, CalibrationError, ShapeError
from qvla_compiler.calibration import check_batches
from qvla_compiler.export import OBS_KEYS, capture_module, capture_policy, widen_batch
from qvla_compiler.models.sampling import FlowSchedule
from qvla_compiler.program import PolicyProgram, Program, with_noise
from qvla_compiler.recipes import QuantRecipe, resolve_recipe
from qvla_compiler.protocol import is_policy
from qvla_compiler.inspect.report import Report, collect_warnings, output_fidelity
from qvla_compiler.inspect.phases import phase
from qvla_compiler.passes._graph import WARNINGS
from qvla_compiler.kernels.bf16_gemms import fp32_products
from qvla_compiler.kernels.cpu_gemm import uncached_weights
from qvla_compiler.kernels.inductor import compile_mode

if TYPE_CHECKING:
    from qvla_compiler.plan import QuantPlan

DEFAULT_RECIPE = "quantvla-w8a8"
FORMAT_VERSION = 2  # 2: one exported program per graph (policy: prefix + denoise step); 1: one, loop unrolled
_EXTRA = ("qvla/meta.json", "qvla/report.json", "qvla/plan.json")


@dataclasses.dataclass
class QuantizedProgram:
    """A quantized policy: run it (`.module()`), inspect it (`.report`, `.plan`), ship it (`.save`)."""

    program: Program
    recipe: QuantRecipe
    report: Report
    plan: list[dict]  # per call site: graph, module path, region, role, bits (saved in the .pt2)
    example_args: tuple = ()  # what save() traces the whole program with
    quant_plan: "QuantPlan | None" = None  # the plan the program was built from: save it to compile again without data

    def module(self, compiled: bool | str | None = None) -> nn.Module:
        """Policy: forward(images, tokens, token_mask, state, noise) -> actions. Module: the forward graph.
        Compiled with Inductor by default (see `LoadedProgram.module`); `compiled=False` gives the eager graphs."""
        if compile_mode(compiled) == "aot":
            return _native(self.program.export(self.example_args), self.program.schedule)
        return _runnable(self.program.as_module(), compiled)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a self-describing `.pt2` (a torch pt2 archive: one exported program per graph, integer weights,
        scales, plan and flow schedule inside).

        Saving the same program twice writes identical bytes. The file appears at `path` only when complete: an
        interrupted save (exception, Ctrl-C) removes its temp file, and the next save removes those of killed runs.
        """
        from qvla_compiler.artifact import write_archive  # torch's serde imports dynamo: ~2 s, only when used

        # one program per graph (policy: prefix + denoise step, the Euler loop stays in Python; module: "model")
        programs = self.program.export(self.example_args)
        return write_archive(programs, Path(path), self._extra_files())  # byte-reproducible; atomic

    def save_aot(self, path: str | os.PathLike) -> Path:
        """Write an AOTInductor package (`qvla quantize --aot`): the same programs compiled ahead of time to native
        code (C++ kernels, the qvla:: ops decomposed as in `module()`), with the same qvla/*.json. Loading it runs
        that native code, so `load` reads it only with trust=True; its module() needs no compiler and no warm-up.
        Compiling takes minutes (a C++ build per graph)."""
        from qvla_compiler.kernels.inductor import aot_package

        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.pt2")
        try:
            aot_package(self.program.export(self.example_args), str(tmp), extra_files=self._extra_files(aot=True))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _extra_files(self, aot: bool = False) -> dict[str, str]:
        schedule = self.program.schedule
        meta = {"format": FORMAT_VERSION, "kind": "policy" if self.program.is_policy else "module",
                "inputs": list(OBS_KEYS) + ["noise"] if self.program.is_policy else None,
                "recipe": dataclasses.asdict(self.recipe),
                "schedule": {"timesteps": list(schedule.timesteps), "dt": schedule.dt} if schedule else None,
                **({"aot_inductor": True} if aot else {})}
        return {"qvla/meta.json": json.dumps(meta, default=str), "qvla/report.json": self.report.to_json(),
                "qvla/plan.json": json.dumps(self.plan)}


@dataclasses.dataclass
class LoadedProgram:
    """A program read back by `load`: its torch.export programs plus the report, plan and meta saved with it.

    `exported_programs`: {"prefix", "denoise"} for a policy (run by the Euler loop over `schedule`), {"model"} for
    a plain module or a format-1 file (where a policy is one program with the loop unrolled)."""

    exported_programs: dict[str, torch.export.ExportedProgram]
    report: Report
    plan: list[dict]
    meta: dict
    schedule: FlowSchedule | None = None  # set when the policy's loop runs in Python (format 2)
    aoti_runners: dict | None = None  # an AOTInductor package (`qvla quantize --aot`): compiled native programs

    @property
    def exported_program(self) -> torch.export.ExportedProgram:
        """The one program of a plain module (or of a format-1 file)."""
        if len(self.exported_programs) != 1:
            raise ArtifactError(f"this program has {len(self.exported_programs)} graphs "
                                f"({', '.join(self.exported_programs)}); use exported_programs[name]")
        return next(iter(self.exported_programs.values()))

    def module(self, compiled: bool | str | None = None) -> nn.Module:
        """Policy: forward(images, tokens, token_mask, state, noise) -> actions. Module: the forward program.

        The fast program by default: each graph compiled with Inductor and the qvla:: decompositions
        (`kernels.inductor.compile_program`, freezing on), lazily, at its first call (which takes a while: seconds to
        minutes by model size; later calls, and new batch sizes after one recompile, are fast). Where Inductor cannot
        compile (no C++ compiler, …) it warns once and runs the eager program. `compiled=False`, or the environment
        variable QVLA_COMPILE=0, gives the eager program (torch.export's modules, as saved). `compiled="aot"` (or
        QVLA_COMPILE=aot): each graph AOTInductor-compiled at its first call per input shape (twice the JIT's time)
        into a private disk cache that later processes load in seconds; it runs as the `--aot` package does."""
        if self.aoti_runners:  # already native code: nothing to compile, no eager form
            run = self.aoti_runners
            return PolicyProgram(run["prefix"], run["denoise"], self.schedule) if self.schedule else run["model"]
        if compile_mode(compiled) == "aot":
            return _native(self.exported_programs, self.schedule)
        if self.schedule is None:
            return _runnable(self.exported_program.module(), compiled)
        eps = self.exported_programs
        return _runnable(PolicyProgram(eps["prefix"].module(), eps["denoise"].module(), self.schedule), compiled)


def _native(programs: dict[str, torch.export.ExportedProgram], schedule: FlowSchedule | None) -> nn.Module:
    """Each exported graph as a NativeCached (AOTInductor at its first call, cached on disk), one shared fallback."""
    from qvla_compiler.kernels.inductor import Fallback
    from qvla_compiler.kernels.native_cache import NativeCached

    fallback = Fallback()
    run = {name: NativeCached(ep, fallback) for name, ep in programs.items()}
    return PolicyProgram(run["prefix"], run["denoise"], schedule) if schedule else _NamedInputErrors(run["model"])


def _runnable(module: nn.Module, compiled: bool | str | None) -> nn.Module:
    """`module` as is (compiled=False, or None under QVLA_COMPILE=0), or compiled lazily with one shared fallback;
    a plain module's program names a mismatching input (_NamedInputErrors)."""
    from qvla_compiler.kernels.inductor import Fallback, LazyCompiled

    if compile_mode(compiled) == "eager":
        return module if isinstance(module, PolicyProgram) else _NamedInputErrors(module)
    fallback = Fallback()
    if isinstance(module, PolicyProgram):
        return PolicyProgram(LazyCompiled(module.prefix, fallback), LazyCompiled(module.denoise, fallback),
                             module.schedule)
    return _NamedInputErrors(LazyCompiled(module, fallback))


class _NamedInputErrors(nn.Module):
    """Runs a plain module's program. torch.export's input guards fail with a bare AssertionError ('Guard failed:
    x.size()[0] == 2') or RuntimeError ('Runtime assertion failed for expression u0 >= 512'); that becomes a
    ShapeError saying what the program takes."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def __getattr__(self, name: str):  # the program's own attributes (`.graph`, `.code`) read through
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.program, name)

    def forward(self, *args, **kwargs):
        try:
            return self.program(*args, **kwargs)
        except (AssertionError, RuntimeError) as err:  # a guard, or a size bound export derived from the example
            if "Guard failed" not in str(err) and "Runtime assertion failed" not in str(err):
                raise
            raise ShapeError(f"the inputs do not fit the program ({err}); it takes inputs shaped like the example "
                             "it was captured with; a FixedBatchWarning in its report says which batch it takes") from err


def quantize(module: nn.Module, example_inputs: Any, calib: Iterable | Any = None,
             recipe: str | QuantRecipe | None = None, *, layout: str | None = None, calib_steps: int = 8,
             seed: int = 0, progress: bool = True, model_name: str | None = None,
             dump_dir: str | None = None, plan=None, input_roles: dict[str, str] | None = None,
             consume: bool = False) -> QuantizedProgram:
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
    quantize = apply(calibrate(...)): with `plan` (a QuantPlan or a plan folder from `calibrate` / `qvla calibrate`)
    calibration is skipped and the plan is applied as it is; its recipe is the one compiled (`recipe` defaults to
    "quantvla-w8a8", or to the plan's; a different recipe or layout beside a plan is a PlanError).
    `consume=True` gives the module's float weights of integer linears up to the compile: calibration releases each
    one as soon as its integer copy exists, so the compile's peak memory stays near the float model's; the module
    cannot run afterwards (using a released weight raises ConsumedWeightError). `qvla quantize` compiles this way.
    """
    recipe, plan = _recipe_and_plan(recipe, layout, plan)
    with phase("capture"):
        target = _capture(module, example_inputs, calib, calib_steps, seed, model_name, input_roles,
                          need_calib=plan is None)
    if plan is None:
        with phase("calibrate"):
            plan = target.calibrate(recipe, progress, consume)
    return target.apply(plan, dump_dir)


def calibrate(module: nn.Module, example_inputs: Any, calib: Iterable | Any = None,
              recipe: str | QuantRecipe | None = None, *, layout: str | None = None, calib_steps: int = 8,
              seed: int = 0, progress: bool = True, model_name: str | None = None,
              input_roles: dict[str, str] | None = None, consume: bool = False) -> "QuantPlan":
    """Calibrate once, compile many times: every decision and tensor `quantize` would use, as a QuantPlan (save it
    with `.save(folder)`; `quantize(..., plan=folder)`, `qvla quantize --plan` and `torch.compile(...,
    backend="qvla", options={"plan": folder})` apply it without data). Arguments (consume too) as for `quantize`."""
    recipe = resolve_recipe(recipe or DEFAULT_RECIPE, layout)
    with phase("capture"):
        target = _capture(module, example_inputs, calib, calib_steps, seed, model_name, input_roles)
    with phase("calibrate"):
        return target.calibrate(recipe, progress, consume)


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


@dataclasses.dataclass
class _Captured:
    """A captured policy or module with everything calibrate and apply need around it."""

    program: Program
    name: str
    calib: Any  # program inputs: (obs, noise) pairs for a policy, argument tuples for a module
    calib_total: int | None
    reference: Any  # the float module's output on `inputs`
    inputs: Any  # one program input, to measure fidelity on
    example_args: tuple  # what save() exports with
    policy: Any = None  # for the ATM style ("auto": GR00T-style for GR00T policies)

    def calibrate(self, recipe: QuantRecipe, progress: bool, consume: bool = False):
        if self.calib is None:
            raise CalibrationError("a plain module needs calibration data: pass calib=[args_tuple, ...]")
        return pipeline.calibrate(self.program, recipe, self.calib, model=self.name,
                                  atm_style=calibration.resolve_style(recipe, self.policy),
                                  total=self.calib_total, progress=progress, consume=consume)

    def apply(self, plan, dump_dir: str | None) -> QuantizedProgram:
        with phase("apply"):
            applied = pipeline.apply(self.program, plan, dump_dir=dump_dir)
        recipe, rows = plan.recipe_object(), applied.rows
        integer = [r for r in rows if r.bits != "float"]
        after = applied.float_bytes - sum(r.bytes_bf16 for r in integer) + sum(r.bytes_quant for r in integer)
        with phase("measure fidelity"), uncached_weights():  # the compile's peak stays the integer program's
            rel, sqnr = output_fidelity(self.reference, self.program.run(self.inputs))  # over every tensor leaf
        report = Report(self.name, recipe.name, recipe.layout, tuple(rows), applied.float_bytes, after,
                        round(rel, 6), round(sqnr, 2), applied.attention,
                        collect_warnings(rows, recipe.layout, self.program.is_policy,
                                         [w for gm in self.program.graphs.values() for w in gm.meta.get(WARNINGS, ())]),
                        tuple(applied.hoisted))
        summary = [{"graph": r.graph, "module_path": r.module_path, "region": r.region, "role": r.role,
                    "bits": r.bits} for r in rows]
        return QuantizedProgram(self.program, recipe, report, summary, self.example_args, plan)


def _capture(module, example_inputs, calib, calib_steps, seed, model_name, input_roles, need_calib=True) -> _Captured:
    module = module.eval()
    as_policy = is_policy(module, need_calibration=calib is None and need_calib)
    check_batches(calib, example_inputs)  # a wrong batch fails here, not after capture
    if as_policy:
        return _capture_policy(module, example_inputs, calib, calib_steps, seed, model_name)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if calib is None and need_calib:
        raise CalibrationError("a plain module needs calibration data: pass calib=[args_tuple, ...]")
    with torch.no_grad():
        ref = module(*args)
    program = Program(capture_module(module, args, input_roles=input_roles))
    return _Captured(program, model_name or type(module).__name__, calib, None, ref, args, args)


def _capture_policy(policy, obs, calib, calib_steps, seed, model_name) -> _Captured:
    noise = policy.example_noise(next(iter(obs.values())).shape[0], seed=seed)
    with phase("capture: export"):
        program = Program(capture_policy(policy, obs, noise), policy.schedule)
    if calib is None:
        calib = policy.calibration_batches(calib_steps, seed=seed)
    if not callable(calib):
        calib = with_noise(calib, tuple(noise.shape[1:]), seed)
    with phase("capture: float reference"), torch.no_grad(), fp32_products(policy):
        ref = policy.sample_actions(*(obs[k] for k in OBS_KEYS), noise=noise)
    example = widen_batch((*(obs[k] for k in OBS_KEYS), noise))  # what save re-exports with: batch >= 2
    return _Captured(program, model_name or type(policy).__name__, calib, calib_steps, ref, (obs, noise), example,
                     policy)


def load(path: str | os.PathLike, *, trust: bool = False) -> LoadedProgram:
    """Load a program written by QuantizedProgram.save. Needs only `import qvla_compiler` (which registers
    the qvla:: ops).

    Data only: tensors, JSON and a weights_only pickle of the sample inputs are read; an archive holding anything
    that would run code on load (a pickled object, a native library, an eval'd expression, a graph calling a
    Python function) raises ArtifactError before any of it runs. `trust=True` skips these checks and loads with
    torch.export.load; use it only for files you wrote yourself. An AOTInductor package (`qvla quantize --aot`,
    `QuantizedProgram.save_aot`) is native code: it loads only with trust=True, and its module() runs that code.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a .pt2 file" if path.is_dir() else "does not exist"
        raise ArtifactError(f"no program at {path} (it {what}); write one with `qvla quantize --out <file>.pt2`")
    from qvla_compiler.artifact import read_archive  # torch's serde imports dynamo: ~2 s, only when used

    runners = _aoti_runners(path, trust)
    programs, extra = (runners, runners.extra) if runners else read_archive(path, _EXTRA, trust=trust)
    if not extra.get("qvla/meta.json"):
        raise ArtifactError(f"{path} is a torch.export program but not a qvla_compiler one (no qvla/meta.json); "
                            "write one with `qvla quantize`")
    try:
        meta = json.loads(extra["qvla/meta.json"])
        fmt = meta.get("format")
        if fmt in (1, FORMAT_VERSION):  # format 1: one program per file, a policy's Euler loop unrolled in it
            policy = fmt == FORMAT_VERSION and meta.get("kind") == "policy"
            schedule = FlowSchedule(tuple(map(float, meta["schedule"]["timesteps"])), float(meta["schedule"]["dt"])) \
                if policy else None
            loaded = LoadedProgram({} if runners else programs, Report.from_json(extra["qvla/report.json"]),
                                   json.loads(extra["qvla/plan.json"]), meta, schedule, runners or None)
    except Exception as exc:  # noqa: BLE001 - damaged or hand-edited JSON
        raise ArtifactError(f"{path} has unreadable qvla metadata ({type(exc).__name__}: {str(exc)[:200]}); "
                            "re-create it with `qvla quantize`") from exc
    if fmt not in (1, FORMAT_VERSION):
        raise ArtifactError(f"{path} has program format {fmt!r}; this qvla_compiler reads 1 and {FORMAT_VERSION}. "
                            "Re-run `qvla quantize` with this version.")
    want = {"prefix", "denoise"} if schedule else {"model"}
    if set(programs) != want:
        raise ArtifactError(f"{path} holds the graphs {sorted(programs)}, but a format-{fmt} {meta.get('kind')} "
                            f"program has {sorted(want)}; re-create it with `qvla quantize`")
    return loaded


class _Runners(dict):
    """An AOTInductor package's compiled programs by name, and its extra files."""

    extra: dict[str, str] = {}


def _aoti_runners(path: Path, trust: bool) -> _Runners:
    """The compiled programs of an AOTInductor package (empty for a plain program). Loading one dlopens its native
    libraries, which run code: refused unless `trust`."""
    native = _native_member(path)
    if native is None:
        return _Runners()
    if not trust:
        raise ArtifactError(f"{path} is an AOTInductor package (`qvla quantize --aot`): it holds compiled native code "
                            f"({native}), and loading it runs that code. Load it with trust=True (`--trust`) only if "
                            "you wrote it yourself, or load the plain .pt2 beside it (data only).")
    from torch.export.pt2_archive._package import load_pt2

    from qvla_compiler.kernels.native_cache import ContiguousInputs

    contents = load_pt2(path)
    runners = _Runners({name: ContiguousInputs(runner) for name, runner in contents.aoti_runners.items()})
    runners.extra = {k: v for k, v in contents.extra_files.items() if k in _EXTRA}
    return runners


def _native_member(path: Path) -> str | None:
    """The first AOTInductor member (compiled code) of the archive, if any."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return next((n for n in zf.namelist() if ("/" + n).find("/data/aotinductor/") >= 0), None)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):  # ValueError: e.g. a member name that is not UTF-8
        return None  # not a readable zip: read_archive says what is wrong with it
