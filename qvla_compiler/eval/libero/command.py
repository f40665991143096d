"""`qvla eval --suite libero`: options checked before anything is built, then evaluate_libero, then JSON or tables."""
from __future__ import annotations

import json
from pathlib import Path

from qvla_compiler.errors import UsageError

__all__ = ["run_libero_eval", "DEFAULT_TASKS", "DEFAULT_EPISODES"]

DEFAULT_TASKS = "libero_spatial,libero_object,libero_goal,libero_10"
DEFAULT_EPISODES = 10


def _check_args(args) -> None:
    from qvla_compiler import preflight

    if not args.lerobot:
        raise UsageError("--suite libero evaluates a lerobot policy folder: pass --lerobot DIR (config.json, "
                         "model.safetensors and lerobot's policy_{pre,post}processor.json, e.g. a download of "
                         "lerobot/pi05_libero; a tiny random one: python -m qvla_compiler.eval.libero.tiny DIR)")
    if not (Path(args.lerobot) / "config.json").is_file():
        raise UsageError(f"--lerobot {args.lerobot}: no config.json there; point it at a lerobot policy folder")
    for flag, value in (("--episodes", args.episodes), ("--jobs", args.jobs), ("--max-steps", args.max_steps),
                        ("--calib-steps", args.calib_steps)):
        if value is not None:
            preflight.positive(value, flag)
    if args.save_video:
        if not args.save_video.endswith(".gif"):
            raise UsageError(f"--save-video writes an animated GIF: give a path ending in .gif, not {args.save_video}")
        preflight.output_file(args.save_video, "--save-video")
    if args.ray is not None and not args.ray.strip():
        raise UsageError("--ray needs an address: host:port of the cluster's head, or 'local' for a Ray on this machine")


def run_libero_eval(args, console) -> int:
    """The libero branch of `qvla eval` (called from qvla_compiler.cli.cmd_eval)."""
    from qvla_compiler.eval.libero.evaluate import FLOAT_RECIPES, evaluate_libero, parse_tasks
    from qvla_compiler.eval.libero.report import print_libero

    _check_args(args)
    if args.recipe not in FLOAT_RECIPES:
        from qvla_compiler.recipes import resolve_recipe

        resolve_recipe(args.recipe, args.layout)
    tasks = args.tasks or DEFAULT_TASKS
    parse_tasks(tasks)  # unknown suites / task ids, or LIBERO missing, before the policy loads
    result = evaluate_libero(args.lerobot, args.recipe, layout=args.layout, tasks=tasks,
                             episodes=args.episodes or DEFAULT_EPISODES, max_steps=args.max_steps,
                             calib_steps=args.calib_steps or 4, noise_seed=args.seed, jobs=args.jobs or 1,
                             ray_address=args.ray, save_video=args.save_video, progress=True)
    if args.json:
        print(json.dumps(result))
    else:
        print_libero(result, console)
    return 0
