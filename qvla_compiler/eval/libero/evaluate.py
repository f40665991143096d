"""`evaluate_libero`: a lerobot policy folder, float vs quantized, on the same LIBERO episodes (paired).

Example::

    from qvla_compiler.eval.libero import evaluate_libero
    r = evaluate_libero("pi05_libero/", "quantvla-w4a8", tasks=["libero_spatial", "libero_object"], episodes=50)
    print(r["success_fp"], r["success_q"], r["p_value"], r["per_suite"]["libero_spatial"]["action_l2"])

Episode e of a task starts from LIBERO's init state e (episodes 0..N-1); the quantized program is calibrated on the
settled first observations of init states counted down from the last one (49, 48, …), disjoint from the evaluated
ones (LIBERO-90's when all 50 are evaluated). Float and quantized policies see the same init states and the same noise at every call (rollout.py); pairs run
in this process, in `jobs` worker processes or on a Ray cluster (parallel.py); report.py aggregates them.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.libero.env import MAX_STEPS, SUITES, LiberoTaskError, suite_tasks

__all__ = ["evaluate_libero", "parse_tasks", "calibration_sources", "FLOAT_RECIPES"]

FLOAT_RECIPES = ("none", "float", "fp32")
CALIB_BATCH = 2
INIT_STATES = 50  # every task of the LIBERO suites ships 50 init states


def parse_tasks(tasks: Sequence[str] | str) -> list[tuple[str, int, str]]:
    """"libero_spatial" (every task of the suite) or "libero_spatial/3" (one task) → [(suite, task id, name)]."""
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not items:
        raise LiberoTaskError(f"no LIBERO tasks given; name suites ({', '.join(SUITES)}) or suite/task-id items")
    out: list[tuple[str, int, str]] = []
    for item in items:
        suite, _, tid = item.partition("/")
        if suite not in SUITES:
            raise LiberoTaskError(f"unknown LIBERO suite {suite!r} in {item!r}; use {', '.join(SUITES)} "
                                  "(optionally /<task id>, e.g. libero_spatial/0)")
        listed = suite_tasks(suite)
        if tid:
            if not tid.isdigit() or int(tid) >= len(listed):
                raise LiberoTaskError(f"{item!r}: {suite} has task ids 0..{len(listed) - 1}")
            listed = [listed[int(tid)]]
        out += [(suite, i, name) for i, name, _ in listed if (suite, i) not in {(s, t) for s, t, _ in out}]
    return out


def _check(episodes, jobs, calib_steps, max_steps, separation_m, save_video, recipe, layout) -> bool:
    if not 1 <= episodes <= INIT_STATES:
        raise QvlaError(f"episodes must be in 1..{INIT_STATES} per task (LIBERO's init states), got {episodes}")
    if jobs < 1:
        raise QvlaError(f"jobs must be >= 1, got {jobs}")
    if calib_steps < 1:
        raise QvlaError(f"calib_steps must be >= 1, got {calib_steps}")
    if max_steps is not None and max_steps < 1:
        raise QvlaError(f"max_steps must be >= 1, got {max_steps}")
    if not separation_m > 0:
        raise QvlaError(f"separation_m must be > 0 (metres), got {separation_m}")
    if save_video and not str(save_video).endswith(".gif"):
        raise QvlaError(f"save_video writes an animated GIF; give a path ending in .gif, not {save_video}")
    is_float = recipe.lower() in FLOAT_RECIPES
    if not is_float:
        from qvla_compiler.recipes import resolve_recipe

        resolve_recipe(recipe, layout)  # RecipeError naming the valid recipes / layouts
    return is_float


def calibration_sources(tasks, episodes: int, n_obs: int) -> list[tuple[str, int, int]]:
    """(suite, task, init state) of `n_obs` calibration observations, none of them an evaluated episode: the
    evaluated tasks' init states counted down from the last (round robin over tasks), then, when evaluation uses
    them all (50 episodes), LIBERO-90's (same robot and scenes, tasks the four test suites do not hold)."""
    evaluated = {(s, t) for s, t, _ in tasks}
    sources = [(s, t, INIT_STATES - 1 - d) for d in range(INIT_STATES - episodes) for s, t, _ in tasks]
    sources += [("libero_90", t, INIT_STATES - 1 - d) for d in range(INIT_STATES) for t in range(90)
                if ("libero_90", t) not in evaluated]
    if len(sources) < n_obs:
        raise QvlaError(f"{n_obs} calibration observations do not fit beside {episodes} episodes of every task "
                        "(LIBERO has 50 init states per task); lower calib_steps or episodes")
    return sources[:n_obs]


def _calibration(policy, tasks, episodes: int, calib_steps: int) -> tuple[list[dict], list[list]]:
    """calib_steps batches of CALIB_BATCH settled first observations from `calibration_sources`, in that order."""
    from qvla_compiler.eval.libero.env import LiberoTaskEnv

    sources = calibration_sources(tasks, episodes, calib_steps * CALIB_BATCH)
    observations: dict[int, dict] = {}
    for key in sorted({src[:2] for src in sources}):
        env = LiberoTaskEnv(*key, policy.render_sizes)
        try:
            for i, (suite, task_id, state) in enumerate(sources):
                if (suite, task_id) == key:
                    obs = env.reset(state)
                    observations[i] = policy.observation(env.frames(), obs, env.instruction)
        finally:
            env.close()
    ordered = [observations[i] for i in range(len(sources))]
    return policy.calibration_batches(ordered, CALIB_BATCH), [list(src) for src in sources]


def _video(path, runner, rows, chosen_n: int, frame_every: int) -> list[dict]:
    from qvla_compiler.eval.video import write_side_by_side_gif

    disagree = [r for r in rows if r["success_fp"] != r["success_q"]]
    firsts = [r for r in rows if r["episode"] == min(x["episode"] for x in rows if x["suite"] == r["suite"]
                                                     and x["task_id"] == r["task_id"])]
    chosen = []
    for r in disagree + firsts:
        if len(chosen) < chosen_n and r not in chosen:
            chosen.append(r)
    frames_a, frames_b, meta = [], [], []
    for r in chosen:
        pair = runner.run((r["suite"], r["task_id"], r["episode"]), frame_every=frame_every)
        fa, fb = pair.fp.frames, pair.q.frames
        n = max(len(fa), len(fb)) + 2  # hold each episode's last frame so the episodes line up
        frames_a += fa + [fa[-1]] * (n - len(fa))
        frames_b += fb + [fb[-1]] * (n - len(fb))
        meta.append({"suite": r["suite"], "task_id": r["task_id"], "episode": r["episode"],
                     "success_fp": pair.fp.success, "success_q": pair.q.success,
                     "reproduced": pair.fp.digest == r["digest_fp"] and pair.q.digest == r["digest_q"]})
    caption = "; ".join(f"{m['suite']}/{m['task_id']}#{m['episode']}" for m in meta)
    scale = max(1, 192 // frames_a[0].shape[0])
    write_side_by_side_gif(str(path), frames_a, frames_b, labels=("float", "quantized"), caption=caption, scale=scale)
    return meta


def evaluate_libero(policy_dir: str | os.PathLike, recipe: str = "quantvla-w8a8", layout: str | None = None,
                    tasks: Sequence[str] | str = ("libero_spatial",), episodes: int = 10, *,
                    max_steps: int | None = None, n_action_steps: int | None = None, calib_steps: int = 4,
                    noise_seed: int = 0, jobs: int = 1, ray_address: str | None = None,
                    save_video: str | None = None, video_episodes: int = 2, video_every: int | None = None,
                    separation_m: float = 0.01, torch_threads: int = 1,
                    camera_map: dict[str, str] | None = None, progress: bool = True) -> dict:
    """Closed-loop LIBERO success of the lerobot policy in `policy_dir`, float and quantized with `recipe`, paired.

    `tasks`: suites and/or suite/task-id items; `episodes` per task (init states 0..episodes-1); `max_steps`
    overrides lerobot's per-suite limits; recipe "none"/"float" skips quantization (a sanity check). `jobs` worker
    processes, or `ray_address` ("local" or host:port) to run pairs as Ray tasks. `save_video=path.gif`: float left,
    quantized right, for `video_episodes` pairs (disagreements first), re-run with a frame every `video_every` steps
    (default: one per policy call, which costs no extra rendering). Returns the dict report.summarize_pairs builds,
    plus settings, timings, calibration and the quantization report.
    """
    from tqdm.auto import tqdm

    from qvla_compiler.eval.libero.parallel import PairRunner, WorkerSpec, build_program, run_units
    from qvla_compiler.eval.libero.policy import load_libero_policy
    from qvla_compiler.eval.libero.report import summarize_pairs

    is_float = _check(episodes, jobs, calib_steps, max_steps, separation_m, save_video, recipe, layout)
    if video_every is not None and video_every < 1:
        raise QvlaError(f"video_every must be >= 1 (steps), got {video_every}")
    task_list = parse_tasks(tasks)
    suites = [s for s in SUITES if any(t[0] == s for t in task_list)]
    t_start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        policy = load_libero_policy(policy_dir, n_action_steps=n_action_steps, camera_map=camera_map)
        out: dict = {"suite": "libero", "policy": Path(policy_dir).name, "policy_dir": str(policy_dir),
                     "recipe": "float" if is_float else recipe, "layout": None, "tasks": [f"{s}/{i}" for s, i, _ in
                                                                                          task_list],
                     "episodes_per_task": episodes, "n_action_steps": policy.n_action_steps,
                     "max_steps": {s: MAX_STEPS[s] if max_steps is None else max_steps for s in suites},
                     "noise_seed": noise_seed, "separation_m": separation_m, "jobs": jobs, "ray": ray_address,
                     "torch_threads": torch_threads, "quantize_seconds": 0.0}
        calib, program = None, None
        if not is_float:
            t_q = time.time()
            calib, used = _calibration(policy, task_list, episodes, calib_steps)
            program = build_program(policy, recipe, layout, calib)
            rep = program.report
            out.update(layout=program.recipe.layout, quantize_seconds=round(time.time() - t_q, 1),
                       calibration={"observations": len(used), "init_states": used},
                       report={"action_rel_l2": rep.action_rel_l2,  # JSON has no Infinity: layout none → null
                               "action_sqnr_db": rep.action_sqnr_db if math.isfinite(rep.action_sqnr_db) else None,
                               "int_linears": rep.int_linears, "float_linears": rep.float_linears,
                               "policy_bytes_bf16": rep.policy_bytes_bf16,
                               "policy_bytes_quant": rep.policy_bytes_quant})
        spec = WorkerSpec(str(policy_dir), None if is_float else recipe, layout,
                          None if calib is None else tuple(calib), n_action_steps,
                          tuple(sorted(camera_map.items())) if camera_map else None,
                          tuple(out["max_steps"].items()), noise_seed, separation_m, torch_threads)
        runner = PairRunner(spec, policy=policy, program=program)
        units = [(s, i, e) for s, i, _ in task_list for e in range(episodes)]
        rows: list[dict] = []
        bar = tqdm(total=len(units), desc=f"LIBERO {out['recipe']}", unit="pair", disable=not progress)
        t_run = time.time()
        try:
            def on_row(row):
                rows.append(row)
                bar.set_postfix_str(f"{row['suite']}/{row['task_id']}#{row['episode']} "
                                    f"fp {'ok' if row['success_fp'] else 'fail'} q {'ok' if row['success_q'] else 'fail'}")
                bar.update(1)

            run_units(units, spec, on_row, jobs=jobs, ray_address=ray_address,
                      runner=runner if jobs == 1 and ray_address is None else None)
        finally:
            bar.close()
        out["rollout_seconds"] = round(time.time() - t_run, 1)
        out.update(summarize_pairs(rows, suites))
        sides = ("fp",) if is_float else ("fp", "q")  # float only: the "quantized" rollout is the float one
        steps = sum(r[f"steps_{x}"] for r in rows for x in sides)
        secs = sum(r[f"seconds_{x}"] for r in rows for x in sides)
        n_roll = len(rows) * len(sides)
        out.update(env_steps=steps, seconds_per_step=secs / max(1, steps), seconds_per_episode=secs / max(1, n_roll))
        if save_video:
            out["video"] = str(save_video)
            out["video_episodes"] = _video(save_video, runner, rows, video_episodes,
                                           video_every or policy.n_action_steps)
        runner.close()
        out["seconds"] = round(time.time() - t_start, 1)
        return out
    finally:
        torch.set_num_threads(threads)
