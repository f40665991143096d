"""`qvla`: quantize policies, inspect saved programs, evaluate in closed loop. Every command takes --json."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
import warnings

from rich.console import Console
from rich.table import Table

from qvla_compiler.errors import QvlaError
from qvla_compiler.inspect.phases import PhaseLog, phase

DEFAULT_MODEL = "pi05-small"
DEFAULT_RECIPE = "w8a8"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    with _signals_as_exceptions():
        try:
            return args.func(args)
        except QvlaError as exc:
            if getattr(args, "json", False):
                print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
            else:
                Console(stderr=True, soft_wrap=True).print(f"[bold red]{type(exc).__name__}[/]: {exc}", highlight=False)
            return 2
        except KeyboardInterrupt:
            print("qvla: interrupted (SIGINT); nothing was written", file=sys.stderr)
            return 130
        except Terminated:
            print("qvla: terminated (SIGTERM); nothing was written", file=sys.stderr)
            return 143


class Terminated(BaseException):
    """SIGTERM as an exception, so `finally` blocks (temporary files of a save) run before the exit.
    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def _signals_as_exceptions():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parser() -> argparse.ArgumentParser:
    from qvla_compiler.recipes import FLOAT_DTYPES, LAYOUTS, RECIPES, ROTATIONS, SMOOTHINGS, WEIGHT_METHODS

    p = argparse.ArgumentParser(prog="qvla", description="QuantVLA as a compiler: VLA policies → integer programs.")
    sub = p.add_subparsers(dest="command")
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])

    q = sub.add_parser("quantize", help="capture, calibrate, quantize and save a policy")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name (default {DEFAULT_MODEL}); see `qvla models`")
    q.add_argument("--recipe", help=f"one of {', '.join(RECIPES)} (default {DEFAULT_RECIPE}, or the plan's), "
                   "optionally with +options, e.g. quantvla-w4a8+gptq")
    q.add_argument("--layout", choices=sorted(LAYOUTS), help="override the recipe's layout")
    q.add_argument("--bpw", type=float, help="with --layout auto: average weight bits per linear (2-16) to allocate "
                   "by each linear's measured action error")
    _add_recipe_overrides(q, ROTATIONS, SMOOTHINGS, WEIGHT_METHODS)
    q.add_argument("--float-dtype", choices=FLOAT_DTYPES, help="what the linears the layout keeps float run in "
                   "(default fp32; bf16 is faster only on CPUs with native bf16: AVX512-BF16 / AMX)")
    q.add_argument("--lerobot", metavar="DIR", help="a lerobot policy folder (save_pretrained: config.json + "
                   "model.safetensors; pi05, pi0, smolvla) to quantize instead of --model; needs "
                   "`bash scripts/install_lerobot.sh`")
    _add_dtype(q)
    q.add_argument("--outliers", action="store_true", help="inject function-preserving activation outliers first")
    q.add_argument("--calib-steps", type=int, default=8, help="calibration batches (default 8)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", help="where to write the .pt2 (default <model>-<recipe>.pt2)")
    q.add_argument("--no-save", action="store_true", help="skip writing the program")
    q.add_argument("--aot", action="store_true", help="also write an AOTInductor package (native code, compiled "
                   "ahead of time; minutes) beside --out as <out>.aoti.pt2; load it with load(path, trust=True)")
    q.add_argument("--dump-dir", help="write every graph's code after each phase here")
    q.add_argument("--plan", help="a plan folder from `qvla calibrate`: skip calibration, use its decisions")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("calibrate", help="calibrate once and save the QuantPlan (safetensors + JSON) to a folder")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--recipe", default=DEFAULT_RECIPE)
    c.add_argument("--layout", choices=sorted(LAYOUTS))
    c.add_argument("--bpw", type=float, help="with --layout auto: average weight bits per linear (2-16)")
    _add_recipe_overrides(c, ROTATIONS, SMOOTHINGS, WEIGHT_METHODS)
    c.add_argument("--calib-steps", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)
    _add_dtype(c)
    c.add_argument("--out", required=True, help="plan folder to write (plan.json, tensors.safetensors)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser("inspect", help="show what a saved program's linears became")
    i.add_argument("program")
    i.add_argument("--json", action="store_true")
    i.add_argument("--html", help="also write one self-contained HTML page (graph, SQNR, α/β, memory) here")
    i.add_argument("--dot", help="also write the linear graph as Graphviz DOT source here")
    i.add_argument("--trust", action="store_true", help="load with torch.export.load, skipping the data-only checks "
                   "(runs whatever the file holds: only for files you wrote yourself)")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("diff", help="what changed between two saved programs")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--json", action="store_true")
    d.add_argument("--trust", action="store_true", help="as for inspect: skip the data-only checks")
    d.set_defaults(func=_run_diff)

    e = sub.add_parser("eval", help="closed-loop success of float vs quantized on identical episodes")
    e.add_argument("--suite", default="tabletop", choices=["tabletop", "libero"],
                   help="tabletop (built-in policies, --model) or libero (a lerobot policy folder, --lerobot)")
    e.add_argument("--model", default="pi05-tabletop")
    e.add_argument("--recipe", default=DEFAULT_RECIPE)
    e.add_argument("--layout", choices=sorted(LAYOUTS))
    e.add_argument("--episodes", type=int, help="episodes per task family (tabletop, default 200) or per LIBERO task "
                   "(default 10; init states 0..N-1)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--save-video", help="write a side-by-side GIF here")
    e.add_argument("--lerobot", metavar="DIR", help="libero: a lerobot policy folder with its processors")
    e.add_argument("--tasks", help="libero: suites and/or suite/task-id items, comma-separated (default "
                   "libero_spatial,libero_object,libero_goal,libero_10)")
    e.add_argument("--max-steps", type=int, help="libero: steps per episode (default: lerobot's per-suite limit)")
    e.add_argument("--calib-steps", type=int, help="libero: calibration batches of LIBERO observations (default 4)")
    e.add_argument("--jobs", type=int, help="libero: episode pairs run in this many worker processes (default 1)")
    e.add_argument("--ray", metavar="ADDRESS", help="libero: run episode pairs as tasks on this Ray cluster "
                   "(host:port, or 'local'); needs `pip install ray`")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    for name, fn, what in (("models", cmd_models, "list model names"), ("recipes", cmd_recipes, "list recipes")):
        s = sub.add_parser(name, help=what)
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=fn)
    return p


def _add_recipe_overrides(parser, rotations, smoothings, weight_methods) -> None:
    parser.add_argument("--rotation", choices=rotations, help="override the recipe's rotation of integer-linear inputs")
    parser.add_argument("--smooth", choices=smoothings, help="override the recipe's smoothing (SmoothQuant or AWQ)")
    parser.add_argument("--weights", choices=weight_methods, help="override the recipe's weight rounding (rtn, gptq)")


def _add_dtype(parser) -> None:
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="what the float policy is "
                        "built and calibrated in (auto: bf16 for the -full presets, whose fp32 build would need twice "
                        "the memory, as the real checkpoints ship; fp32 otherwise)")


def cmd_quantize(args) -> int:
    from qvla_compiler import preflight

    # Every option is checked before the model is built: a bad path or name costs nothing.
    name = preflight.lerobot_source(args) if args.lerobot else preflight.model_name(args.model)
    dtype = preflight.build_dtype(args)
    preflight.positive(args.calib_steps, "--calib-steps")
    recipe, plan = preflight.quantize_options(args)
    recipe = preflight.with_float_dtype(recipe, plan, args.float_dtype)
    out = None if args.no_save else preflight.output_file(args.out or f"{name}-{recipe.name}.pt2", "--out")
    if args.aot and out is None:
        from qvla_compiler.errors import UsageError

        raise UsageError("--aot writes its package beside the program; drop --no-save")
    aot = None if not args.aot else preflight.output_file(str(out.with_name(out.name.removesuffix(".pt2"))) +
                                                          ".aoti.pt2", "--aot")
    if args.dump_dir:
        preflight.output_dir(args.dump_dir, "--dump-dir")
    console = Console(stderr=True)
    started = time.perf_counter()
    if recipe.float_dtype == "bf16":
        from qvla_compiler.lowering import native_bf16

        if not native_bf16():
            console.print("[yellow]note[/]: --float-dtype bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): the "
                          "float linears will run slower than in fp32 here", highlight=False)
        warnings.filterwarnings("ignore", message="float linears in bf16 on a CPU without native bf16")
    with PhaseLog(on_end=lambda p: console.log(f"{p.name}: {p.seconds:.0f} s, peak {p.peak_rss_gb:.2f} GB resident",
                                               highlight=False)) as log:
        qp = _quantize_and_save(args, name, recipe, plan, out, aot, console)
    summary = {**qp.report.summary(), "out": None if out is None else str(out),
               "aot": None if aot is None else str(aot), "dtype": dtype,
               "float_dtype": recipe.float_dtype,
               "seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": log.peak_rss_gb,
               "phases": log.as_json()}
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _quantize_and_save(args, name, recipe, plan, out, aot, console):
    """Build, quantize and write: each step a phase of the report (wall time, peak RSS)."""
    import qvla_compiler

    with phase("build"), console.status(f"building {name}", spinner="dots"):
        policy = _build_policy(args)
    # print, not log: rich's log reads this frame's f_locals, a snapshot that would keep `policy` alive after the del
    console.print(f"built {name}; capturing, calibrating ({args.calib_steps} batches) and lowering", highlight=False)
    if args.lerobot and plan is None:
        recipe = policy.recipe(recipe)  # the few name overrides a lerobot architecture needs, if any
    if args.outliers:
        from qvla_compiler.models.outliers import inject_outliers

        inject_outliers(policy)
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, calib_steps=args.calib_steps,
                                seed=args.seed, progress=not args.json, model_name=name,
                                dump_dir=args.dump_dir, plan=plan, consume=True)
    del policy  # calibration released the float weights of the integer linears (consume); the rest goes before save
    if out is not None:
        with phase("save"), console.status(f"saving {out}", spinner="dots"):
            qp.save(out)
    if aot is not None:
        with phase("save AOTInductor package"), \
                console.status(f"compiling the AOTInductor package {aot} (minutes)", spinner="dots"):
            qp.save_aot(aot)
    return qp


def _build_policy(args):
    if args.lerobot:
        from qvla_compiler.integrations.lerobot import load_pretrained

        with contextlib.redirect_stdout(sys.stderr):  # lerobot prints notices; stdout is for the summary / JSON
            return load_pretrained(args.lerobot)
    from qvla_compiler import preflight
    from qvla_compiler.models import build_policy
    from qvla_compiler.models.registry import BUILD_DTYPES

    return build_policy(args.model, seed=args.seed, dtype=BUILD_DTYPES[preflight.build_dtype(args)])


def cmd_calibrate(args) -> int:
    import qvla_compiler
    from qvla_compiler import preflight
    from qvla_compiler.models import build_policy
    from qvla_compiler.models.registry import BUILD_DTYPES
    from qvla_compiler.recipes import resolve_recipe

    preflight.model_name(args.model)
    preflight.positive(args.calib_steps, "--calib-steps")
    recipe = preflight.with_overrides(resolve_recipe(args.recipe, args.layout, args.bpw), args)
    preflight.output_dir(args.out, "--out")
    with PhaseLog() as log:
        with phase("build"):
            policy = build_policy(args.model, seed=args.seed, dtype=BUILD_DTYPES[preflight.build_dtype(args)])
        plan = qvla_compiler.calibrate(policy, policy.example_inputs(), recipe=recipe, calib_steps=args.calib_steps,
                                       seed=args.seed, progress=not args.json, model_name=args.model, consume=True)
        with phase("save"):
            out = str(plan.save(args.out))
    summary = {"out": out, "model": args.model, "recipe": recipe.name, "modules": len(plan.modules),
               "quantized": len(plan.quantized), "peak_rss_gb": log.peak_rss_gb, "phases": log.as_json()}
    print(json.dumps(summary) if args.json else f"wrote plan {out}: {summary['quantized']} of "
          f"{summary['modules']} linears integer ({recipe.name}); reuse it with `qvla quantize --plan {out}` "
          f"or torch.compile(..., backend=\"qvla\", options={{\"plan\": {out!r}}})")
    return 0


def _run_diff(args) -> int:
    from qvla_compiler.inspect.commands import run_diff

    return run_diff(args, _console())


def _console() -> Console:
    # Piped output (a file, a CI log) gets a wide page instead of rich's 80-column default, so paths stay whole.
    return Console() if sys.stdout.isatty() else Console(width=200)


def _print_summary(s: dict) -> None:
    console = _console()
    table = Table("region", "integer linears", "float linears",
                  title=f"{s['model']} · {s['recipe']} · layout {s['layout']}")
    for region, row in s["regions"].items():
        formats = " + ".join(f"{n} {f}" for f, n in sorted(row.get("formats", {}).items()))  # older reports: none
        table.add_row(region, formats or str(row["int"]), str(row["float"]))
    console.print(table)
    mib = 1 / 2**20
    console.print(f"quantized components: {s['bytes_bf16'] * mib:.2f} MiB bf16 → {s['bytes_quant'] * mib:.2f} MiB "
                  f"({s['memory_saving']:.1%} saved)")
    console.print(f"whole policy:         {s['policy_bytes_bf16'] * mib:.2f} MiB bf16 → "
                  f"{s['policy_bytes_quant'] * mib:.2f} MiB ({s['policy_memory_saving']:.1%} saved)")
    console.print(f"action fidelity vs float (same noise): rel L2 {s['action_rel_l2']:.4f}, "
                  f"SQNR {s['action_sqnr_db']:.1f} dB")
    for warning in s.get("warnings") or ():
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)
    if s.get("phases"):  # the top-level phases (inner ones, "calibrate: …", are in --json)
        top = [p for p in s["phases"] if ": " not in p["name"]]
        console.print(f"peak memory {s['peak_rss_gb']:.2f} GB resident; " +
                      ", ".join(f"{p['name']} {p['seconds']:.0f} s ({p['peak_rss_gb']:.2f} GB)" for p in top))
    if s.get("out"):
        console.print(f"wrote {s['out']} in {s['seconds']} s")
    if s.get("aot"):
        console.print(f"wrote the AOTInductor package {s['aot']} (native code: qvla_compiler.load(path, trust=True))")


def cmd_inspect(args) -> int:
    from qvla_compiler import preflight
    from qvla_compiler.inspect.commands import run_inspect

    for flag, path in (("--html", args.html), ("--dot", args.dot)):
        if path:
            preflight.output_file(path, flag)
    return run_inspect(args, _console(), _print_summary)


def cmd_eval(args) -> int:
    from qvla_compiler import preflight

    if args.suite == "libero":
        from qvla_compiler.eval.libero.command import run_libero_eval

        return run_libero_eval(args, _console())
    libero_only = [f for f, v in (("--lerobot", args.lerobot), ("--tasks", args.tasks), ("--max-steps", args.max_steps),
                                  ("--calib-steps", args.calib_steps), ("--jobs", args.jobs), ("--ray", args.ray))
                   if v is not None]
    if libero_only:
        from qvla_compiler.errors import UsageError

        raise UsageError(f"{', '.join(libero_only)} only apply to --suite libero")
    args.episodes = 200 if args.episodes is None else args.episodes
    preflight.model_name(args.model)
    preflight.positive(args.episodes, "--episodes")
    if args.recipe not in ("none", "float", "fp32"):  # evaluate's float names
        from qvla_compiler.recipes import resolve_recipe

        resolve_recipe(args.recipe, args.layout)
    if args.save_video:
        preflight.output_file(args.save_video, "--save-video")
    try:
        from qvla_compiler.eval.evaluate import evaluate
    except ImportError as exc:
        raise QvlaError(f"closed-loop evaluation is not available in this build ({exc})") from exc
    result = evaluate(args.model, args.recipe, layout=args.layout, episodes=args.episodes, seed=args.seed,
                      progress=not args.json, save_video=args.save_video)
    if args.json:
        print(json.dumps(result))
    else:
        _print_eval(result)
    return 0


def _print_eval(r: dict) -> None:
    pct = "{:.1%}".format
    table = Table(title=f"{r['model']} · {r['recipe']} · {r['episodes_per_family']} episodes per task family")
    for col in ("family", "float", "95% CI", "quantized", "95% CI"):
        table.add_column(col)
    for family, e in r["per_family"].items():
        table.add_row(family, pct(e["success_fp"]), _ci(e["ci_fp"]), pct(e["success_q"]), _ci(e["ci_q"]))
    table.add_row("mean", pct(r["success_fp_mean"]), "", pct(r["success_q_mean"]), "")
    console = _console()
    console.print(table)
    console.print(f"{r['episodes']} paired episodes; McNemar p = {r['p_value']:.3g}; mean first-chunk action "
                  f"divergence {r['action_divergence']:.4f}")


def _ci(ci) -> str:
    return f"{ci[0]:.1%}–{ci[1]:.1%}"


def cmd_models(args) -> int:
    from qvla_compiler.models import MODEL_NAMES

    print(json.dumps(list(MODEL_NAMES)) if args.json else "\n".join(MODEL_NAMES))
    return 0


def cmd_recipes(args) -> int:
    import dataclasses

    from qvla_compiler.recipes import OPTIONS, RECIPES

    if args.json:
        print(json.dumps({k: dataclasses.asdict(v) for k, v in RECIPES.items()}, default=str))
    else:
        for name, r in RECIPES.items():
            print(f"{name:16s} W{r.w_bits}A{r.a_bits} layout={r.layout} act={r.act_mode} clip={r.weight_clip} "
                  f"weights={r.weight_method}")
        print(f"options (recipe+option+...): {' '.join(OPTIONS)} bpw<B>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
