"""Where episode pairs run: in this process, in worker processes on this machine (`jobs`), or as tasks of a Ray
cluster (`ray_address`; Ray is an optional dependency). A worker rebuilds the float policy from its folder and the
quantized program from the same calibration batches (deterministic: the same program in every process), keeps one
LIBERO environment per task it is running, and returns each pair's JSON row; the caller orders rows by
(suite, task, episode), so results do not depend on the number of workers or the order they finish in. Every
process runs torch with the same number of threads, so rollouts are bit-identical whatever the worker count.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from qvla_compiler.errors import QvlaError

__all__ = ["WorkerSpec", "PairRunner", "build_program", "run_units", "RayNotInstalledError"]

Unit = tuple[str, int, int]  # (suite, task id, episode)


class RayNotInstalledError(QvlaError, ImportError):
    """--ray was given but Ray cannot be imported."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a fresh process needs to rebuild the policies and run pairs (picklable)."""

    policy_dir: str
    recipe: str | None            # None: the quantized policy is the float one
    layout: str | None
    calib: tuple | None           # calibration batches (observation dicts of tensors)
    n_action_steps: int | None
    camera_map: tuple | None      # ((policy camera, LIBERO camera), ...)
    max_steps: tuple              # ((suite, max steps), ...)
    noise_seed: int
    separation_m: float
    torch_threads: int


def build_program(policy, recipe: str, layout: str | None, calib: list[dict]):
    """The quantized program of a LiberoPolicy's wrapped lerobot policy, calibrated on LIBERO observations."""
    import qvla_compiler

    w = policy.wrapped
    with contextlib.redirect_stdout(sys.stderr):
        return qvla_compiler.quantize(w, calib[0], calib, recipe=w.recipe(recipe, layout), calib_steps=len(calib),
                                      progress=False)


class PairRunner:
    """Runs episode pairs in one process: the float policy, the quantized program, one cached environment."""

    def __init__(self, spec: WorkerSpec, policy=None, program=None):
        from qvla_compiler.eval.libero.policy import load_libero_policy

        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.policy = policy or load_libero_policy(spec.policy_dir, n_action_steps=spec.n_action_steps,
                                                   camera_map=dict(spec.camera_map) if spec.camera_map else None)
        if spec.recipe is not None and program is None:
            program = build_program(self.policy, spec.recipe, spec.layout, list(spec.calib))
        self.act_fp = self.policy.float_actions
        self.act_q = None if program is None else self.policy.program_actions(program.module())
        self._env, self._env_key = None, None

    def env(self, suite: str, task_id: int):
        from qvla_compiler.eval.libero.env import LiberoTaskEnv

        if self._env_key != (suite, task_id):
            if self._env is not None:
                self._env.close()
            self._env = LiberoTaskEnv(suite, task_id, self.policy.render_sizes, dict(self.spec.max_steps)[suite])
            self._env_key = (suite, task_id)
        return self._env

    def run(self, unit: Unit, frame_every: int | None = None):
        from qvla_compiler.eval.libero.rollout import run_pair

        suite, task_id, episode = unit
        return run_pair(self.env(suite, task_id), self.policy, self.act_fp, self.act_q, episode,
                        self.spec.noise_seed, self.spec.separation_m, frame_every)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env, self._env_key = None, None


# ------------------------------------------------------------------------------------------------ worker processes
_RUNNER: PairRunner | None = None


def _quiet_stdout() -> None:
    # lerobot, robosuite and LIBERO print to stdout; in a worker that would land in the parent's --json output
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def _init_worker(spec: WorkerSpec) -> None:
    global _RUNNER
    _quiet_stdout()
    _RUNNER = PairRunner(spec)


def _run_in_worker(unit: Unit) -> dict:
    return _RUNNER.run(unit).to_json()


class _RayWorker:
    def __init__(self, spec: WorkerSpec):
        _quiet_stdout()
        self.runner = PairRunner(spec)

    def run(self, unit: Unit) -> dict:
        return self.runner.run(unit).to_json()


def _import_ray():
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise RayNotInstalledError(f"--ray needs Ray ({exc}); install it with `pip install ray` (or "
                                   "`pip install -e '.[ray]'`) on every machine of the cluster, or drop --ray to run "
                                   "on this machine") from exc
    return ray, ActorPool


def run_units(units: list[Unit], spec: WorkerSpec, on_row: Callable[[dict], None], *, jobs: int = 1,
              ray_address: str | None = None, runner: PairRunner | None = None) -> None:
    """Run every unit, calling `on_row(row)` as each pair finishes (in any order)."""
    if ray_address is not None:
        _run_ray(units, spec, on_row, jobs, ray_address)
    elif jobs <= 1:
        runner = runner or PairRunner(spec)
        for unit in units:
            on_row(runner.run(unit).to_json())
    else:
        _run_pool(units, spec, on_row, jobs)


def _run_pool(units: Iterable[Unit], spec: WorkerSpec, on_row, jobs: int) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")  # fresh processes: no inherited OpenGL context or torch threads
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(spec,)) as pool:
        futures = [pool.submit(_run_in_worker, u) for u in units]
        try:
            for fut in as_completed(futures):
                on_row(fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _run_ray(units: list[Unit], spec: WorkerSpec, on_row, jobs: int, address: str) -> None:
    ray, ActorPool = _import_ray()
    runtime_env = None
    if address == "local":  # a Ray started here: its workers import this very qvla_compiler (a cluster installs it)
        import qvla_compiler

        root = os.path.dirname(os.path.dirname(os.path.abspath(qvla_compiler.__file__)))
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
    with contextlib.redirect_stdout(sys.stderr):
        ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False, runtime_env=runtime_env)
    try:
        n = jobs if jobs > 1 else int(ray.cluster_resources().get("CPU", 1))
        actor = ray.remote(num_cpus=1)(_RayWorker)
        pool = ActorPool([actor.remote(spec) for _ in range(max(1, min(n, len(units))))])
        for row in pool.map_unordered(lambda a, u: a.run.remote(u), units):
            on_row(row)
    finally:
        ray.shutdown()
