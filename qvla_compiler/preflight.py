"""Check every command-line argument before any work starts.

A compile takes minutes; a bad `--out` found after it loses the work. So every path a command will write is probed
first (not a directory, not under a file, really writable — probed with a temporary file, since root ignores mode
bits), every name is resolved, and options that contradict each other are refused — all before a model is built.
Nothing is created here except the probe file, which is removed at once.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qvla_compiler.errors import UsageError


def output_file(path: str | os.PathLike, flag: str) -> Path:
    """A file the command will write: its folder may not exist yet (it is created at write time)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name inside it, e.g. {flag} {path / 'out.pt2'}")
    _writable_ancestor(path.parent, flag, path)
    return path


def output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A folder the command will write files into (created at write time when missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; give a folder path (it is created if missing)")
    _writable_ancestor(path, flag, path)
    return path


def positive(value: int, flag: str) -> int:
    if value < 1:
        raise UsageError(f"{flag} must be at least 1, got {value}")
    return value


def _writable_ancestor(folder: Path, flag: str, target: Path) -> None:
    """The nearest existing ancestor of `folder` must be a folder we can create files in."""
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {target}: {probe} is a file, so nothing can be written under it; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".qvla-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {target}: cannot write in {probe} ({exc.strerror or exc}); choose a writable "
                         "folder") from exc


def quantize_options(args):
    """Resolve --recipe / --layout / --plan of `qvla quantize` into (recipe, plan), refusing contradictions.

    A plan fixes the recipe and every decision, so a --recipe, --layout, --rotation, --smooth or --weights that differs from
    the plan's would be silently ignored (and mislabel the program): that is an error, not a preference."""
    from qvla_compiler.plan import PlanError, as_plan
    from qvla_compiler.recipes import resolve_recipe

    if args.plan is None:
        return with_overrides(resolve_recipe(args.recipe or "w8a8", args.layout, args.bpw), args), None
    plan = as_plan(args.plan)
    planned = plan.recipe_object()
    conflicts = [f"{flag} {given} (the plan says {want})" for flag, given, want in (
        ("--recipe", args.recipe, planned.name), ("--layout", args.layout, planned.layout),
        ("--rotation", args.rotation, planned.rotation), ("--smooth", args.smooth, planned.smooth),
        ("--weights", args.weights, planned.weight_method), ("--bpw", args.bpw, planned.bpw))
        if given is not None and given != want]
    if conflicts:
        raise PlanError(f"--plan {args.plan} was calibrated with recipe {planned.name} (layout {planned.layout}), "
                        f"which conflicts with {', '.join(conflicts)}; drop those options, or re-run "
                        "`qvla calibrate` with them")
    return planned, plan


def with_overrides(recipe, args):
    """The recipe with --rotation / --smooth / --weights applied; the name says what was overridden."""
    if not (args.rotation or args.smooth or args.weights):
        return recipe
    name = recipe.name + "".join(f"+{v}" for v in (args.smooth, args.rotation, args.weights) if v)
    return recipe.with_(rotation=args.rotation, smooth=args.smooth, weight_method=args.weights, name=name)


def model_name(name: str) -> str:
    from qvla_compiler.models import get_config

    get_config(name)  # ModelNotFoundError listing the valid names
    return name


def lerobot_source(args) -> str:
    """`--lerobot DIR`: a folder with config.json, not combined with options that only fit the built-in policies."""
    folder = Path(args.lerobot)
    if not (folder / "config.json").is_file():
        raise UsageError(f"--lerobot {folder}: no config.json there; point it at a folder written by lerobot's "
                         "policy.save_pretrained(dir)")
    if args.outliers:
        raise UsageError("--outliers injects outliers into the built-in reference policies only; drop it with "
                         "--lerobot")
    return f"lerobot-{folder.name}"


def build_dtype(args) -> str:
    """--dtype, with auto resolved: bf16 for the -full presets (their fp32 build needs twice the memory), fp32
    otherwise. A --lerobot policy is quantized in the dtype lerobot loads it in."""
    if getattr(args, "lerobot", None):
        if args.dtype != "auto":
            raise UsageError("--dtype sets how a --model preset is built; a --lerobot policy is quantized in the dtype "
                             "lerobot loads it in: drop --dtype")
        return "fp32"
    if args.dtype != "auto":
        return args.dtype
    return "bf16" if args.model.endswith("-full") else "fp32"


def with_float_dtype(recipe, plan, float_dtype):
    """--float-dtype on the recipe; a plan fixes it (a different one is a PlanError, as for --layout)."""
    if float_dtype is None or float_dtype == recipe.float_dtype:
        return recipe
    if plan is not None:
        from qvla_compiler.plan import PlanError

        raise PlanError(f"the plan was calibrated with float_dtype {recipe.float_dtype}, not {float_dtype}; drop "
                        "--float-dtype, or re-run `qvla calibrate`")
    return recipe.with_(float_dtype=float_dtype, name=f"{recipe.name}+{float_dtype}")
