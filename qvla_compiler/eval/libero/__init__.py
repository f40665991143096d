"""LIBERO closed-loop evaluation of a lerobot policy, float vs quantized, on the same episodes.

    from qvla_compiler.eval.libero import evaluate_libero
    r = evaluate_libero("pi05_libero/", "quantvla-w4a8", tasks="libero_spatial,libero_object", episodes=50)

or `qvla eval --suite libero --lerobot DIR ...`. Needs the simulator: `pip install -e ".[libero]"` (or
`bash scripts/install_libero.sh`) and lerobot (`bash scripts/install_lerobot.sh`). Modules: env (one LIBERO task),
policy (observation → lerobot policy input → LIBERO actions), rollout (paired episodes and divergence), parallel
(worker processes, Ray), report (statistics), evaluate (the API), tiny (a random-weight π0.5 folder for tests).
Importing this package imports neither LIBERO nor lerobot.
"""
from qvla_compiler.eval.libero.env import (
    INSTALL_COMMAND, MAX_STEPS, SUITES, LiberoNotInstalledError, LiberoRenderError, LiberoTaskError, libero_available,
)
from qvla_compiler.eval.libero.evaluate import evaluate_libero, parse_tasks

__all__ = ["INSTALL_COMMAND", "MAX_STEPS", "SUITES", "LiberoNotInstalledError", "LiberoRenderError",
           "LiberoTaskError", "libero_available", "evaluate_libero", "parse_tasks"]
